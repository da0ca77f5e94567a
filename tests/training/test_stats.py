"""The interval code on distributions whose answers are known: coverage of the bootstrap interval, the AUROC of two
normal distributions, and verdicts that say "better" only when the interval of the difference excludes 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conceptlens.training.stats import (
    auroc,
    bootstrap_auroc,
    bootstrap_difference,
    bootstrap_mean,
    roc_curve,
    verdict,
)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for trial in range(120):
        sample = rng.exponential(2.0, 200)  # skewed; true mean 2
        interval = bootstrap_mean(list(sample), resamples=400, seed=trial)
        hits += interval.low <= 2.0 <= interval.high
        widths.append(interval.high - interval.low)
    assert 0.88 <= hits / 120 <= 0.995
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(200), rel=0.15)  # ≈ 2·1.96·σ/√n


def test_seed_groups_widen_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(1)
    same = [list(rng.normal(0.5, 0.1, 100)) for _ in range(3)]
    apart = [list(rng.normal(m, 0.1, 100)) for m in (0.3, 0.5, 0.7)]
    narrow, wide = bootstrap_mean(same, resamples=500), bootstrap_mean(apart, resamples=500)
    assert wide.high - wide.low > 5 * (narrow.high - narrow.low)


def test_auroc_of_two_normals_is_phi_of_d_over_root_2():
    rng = np.random.default_rng(2)
    neg, pos = rng.normal(0, 1, 4000), rng.normal(1, 1, 4000)
    expected = 0.5 * (1 + math.erf(1 / 2))  # Φ(1/√2) = 0.7602
    assert auroc(neg, pos) == pytest.approx(expected, abs=0.015)
    assert auroc([0, 1], [1, 2]) == pytest.approx(0.875)  # the tie counts half
    fpr, tpr = roc_curve([0, 1], [2, 3])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_paired_auroc_intervals_and_verdicts():
    rng = np.random.default_rng(3)
    n = 300
    clean = {"good": rng.normal(0, 1, n), "weak": rng.normal(0, 1, n), "twin": rng.normal(0, 1, n)}
    adv = {"good": rng.normal(2, 1, n), "weak": rng.normal(0.3, 1, n), "twin": rng.normal(2, 1, n)}
    single, pairs = bootstrap_auroc(clean, adv, resamples=400)
    assert single["good"].low > 0.85 and single["weak"].high < 0.7
    assert verdict(pairs[("good", "weak")]) == "better" and verdict(pairs[("weak", "good")]) == "worse"
    assert verdict(pairs[("good", "twin")]) == "no measurable difference"


def test_difference_of_means_needs_the_interval_to_exclude_zero():
    rng = np.random.default_rng(4)
    a = [list(rng.normal(0.52, 0.05, 200)) for _ in range(3)]
    b = [list(rng.normal(0.50, 0.05, 200)) for _ in range(3)]
    c = [list(rng.normal(0.50, 0.05, 200)) for _ in range(3)]
    assert verdict(bootstrap_difference(a, b, resamples=500)) == "better"
    assert verdict(bootstrap_difference(b, a, resamples=500), higher_is_better=False) == "better"
    assert verdict(bootstrap_difference(b, c, resamples=500)) == "no measurable difference"


def test_binomial_interval_covers_the_true_rate_95_percent_of_the_time():
    """Wilson intervals of a 5% rate on 200 trials, over many draws: the true rate inside about 95% of the time,
    and the bounds inside [0, 1] even with no successes."""
    from conceptlens.training.stats import binomial_interval

    rng = np.random.default_rng(0)
    draws = rng.binomial(200, 0.05, 4000)
    covered = np.mean([binomial_interval(int(k), 200).low <= 0.05 <= binomial_interval(int(k), 200).high
                       for k in draws])
    assert 0.93 <= covered <= 0.975
    zero = binomial_interval(0, 50)
    assert zero.value == 0 and zero.low == 0 and 0.05 < zero.high < 0.1
    assert str(binomial_interval(10, 200)) == "0.050 [0.027, 0.090]"
