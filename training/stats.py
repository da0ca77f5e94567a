"""Uncertainty for the experiment's numbers: bootstrap 95% intervals, AUROC, and verdicts that need evidence.

- `bootstrap_mean`: the mean of per-(seed, image) values with a percentile interval from resampling seeds, then
  images within each drawn seed (a two-level bootstrap: training seeds and probe images both vary).
- `auroc` (Mann-Whitney, ties count half) and `bootstrap_auroc`: clean and adversarial scores resampled
  separately, paired across detectors when they score the same images, so differences have intervals too.
- `binomial_interval`: a rate (e.g. a clean flag rate) with its Wilson 95% interval.
- `verdict`: "better" / "worse" only when the 95% interval of the difference excludes 0, else
  "no measurable difference" (docs/design.md §5; issue 13).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval [low, high]."""

    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _percentile_interval(value: float, draws: np.ndarray, level: float) -> Interval:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(value, float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(float(value), float(low), float(high))


def bootstrap_mean(groups: Sequence[Sequence[float]] | Sequence[float], *, resamples: int = RESAMPLES,
                   level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean with a bootstrap interval. `groups` is one list of per-image values per training seed (or one flat list
    of values: a single group). Each draw resamples the groups with replacement, then the values within each drawn
    group, and averages everything drawn."""
    arrays = _groups(groups)
    if not arrays:
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(np.mean(np.concatenate(arrays)))
    return _percentile_interval(value, _draws(arrays, resamples, seed), level)


def bootstrap_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
                         resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """mean(a) − mean(b) for two independent sets of per-seed groups, each resampled as in `bootstrap_mean`."""
    ga, gb = _groups(a), _groups(b)
    if not ga or not gb:
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(np.concatenate(ga).mean() - np.concatenate(gb).mean())
    return _percentile_interval(value, _draws(ga, resamples, seed) - _draws(gb, resamples, seed + 1), level)


def _groups(groups) -> list[np.ndarray]:
    """Per-seed arrays of finite values (a flat list of values is one group); empty groups dropped."""
    if len(groups) and not isinstance(groups[0], Sequence | np.ndarray):
        groups = [groups]
    arrays = [a[np.isfinite(a)] for a in (np.asarray(g, dtype=np.float64) for g in groups)]
    return [a for a in arrays if a.size]


def _draws(arrays: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(0, len(arrays), len(arrays))
        samples = [arrays[g][rng.integers(0, arrays[g].size, arrays[g].size)] for g in picked]
        out[r] = np.concatenate(samples).mean()
    return out


def verdict(difference: Interval, higher_is_better: bool = True) -> str:
    """"better" / "worse" when the interval of the difference excludes 0, else "no measurable difference"."""
    if not np.isfinite(difference.low) or not difference.excludes_zero():
        return "no measurable difference"
    return "better" if (difference.value > 0) == higher_is_better else "worse"


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Area under the ROC curve for scores where positives should be higher: P(pos > neg) + P(tie) / 2."""
    neg = np.asarray(negatives, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    values = np.concatenate([neg, pos])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(values.size)
    sorted_values = values[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    rank_sum = ranks[neg.size:].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2) / (neg.size * pos.size))


def roc_curve(negatives: Sequence[float], positives: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) over all thresholds, from (0, 0) to (1, 1)."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    pos = np.sort(np.asarray(positives, dtype=np.float64))
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = [0.0] + [float((neg >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((pos >= t).mean()) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def bootstrap_auroc(negatives: Mapping[str, Sequence[float]], positives: Mapping[str, Sequence[float]], *,
                    resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                    ) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """AUROC with intervals for each detector (keys of both mappings, each scoring the same clean images and the
    same adversarial images in the same order), and the interval of every pairwise difference: one resample of
    images is shared by all detectors (a paired bootstrap)."""
    names = list(negatives)
    neg = {k: np.asarray(negatives[k], dtype=np.float64) for k in names}
    pos = {k: np.asarray(positives[k], dtype=np.float64) for k in names}
    n_neg, n_pos = len(next(iter(neg.values()))), len(next(iter(pos.values())))
    point = {k: auroc(neg[k], pos[k]) for k in names}
    if n_neg == 0 or n_pos == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return {k: nan for k in names}, {(a, b): nan for a in names for b in names if a < b}
    rng = np.random.default_rng(seed)
    draws = {k: np.empty(resamples) for k in names}
    for r in range(resamples):
        i = rng.integers(0, n_neg, n_neg)
        j = rng.integers(0, n_pos, n_pos)
        for k in names:
            draws[k][r] = auroc(neg[k][i], pos[k][j])
    single = {k: _percentile_interval(point[k], draws[k], level) for k in names}
    pairs = {(a, b): _percentile_interval(point[a] - point[b], draws[a] - draws[b], level)
             for a in names for b in names if a != b}
    return single, pairs


def binomial_interval(successes: int, trials: int, level: float = LEVEL) -> Interval:
    """A proportion with its Wilson score interval (Wilson 1927): unlike the normal approximation it stays inside
    [0, 1] and keeps its coverage for rates near 0, such as a 5% clean flag rate on a few hundred images."""
    if trials <= 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return Interval(float(p), float(max(0.0, centre - half)), float(min(1.0, centre + half)))
