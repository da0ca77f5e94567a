"""A per-unit streaming quantile sketch that stays on the device: KLL, vectorised over units.

Karnin, Lang & Liberty, "Optimal Quantile Approximation in Streams", FOCS 2016 (the KLL sketch; NetDissect-Lite's
`util/vecquantile.py` uses the same idea for the same job). Each unit keeps a stack of compactors; level h holds
items of weight 2^h and has capacity max(2, ceil(k·(2/3)^(H-1-h))) for H levels. A full level is sorted and every
other item (random offset) of its lower part is promoted one level up with double weight; its top half stays
(the high-rank-accuracy rule of ReqSketch: Cormode, Karnin, Liberty, Thaler & Veselý, "Relative Error Streaming
Quantiles", PODS 2021), because dissection asks for the top 0.5% tail. Every unit sees the same number of values
per update, so all units' compactors have the same sizes and the whole sketch is a few (units, n_h) tensors.

Memory: at most ~3k values per unit plus the update being absorbed, independent of the stream length
(the number of levels grows as log2(n/k), each adding <= 2 values).
Error: the rank of the returned value is within ε·n of the requested rank, ε = O(1/k) with high probability
(KLL). Measured over 60,000 drifting values per unit with k = 128 (tests/training/test_quantile.py): rank error
≤ 2/k·n at any p, and ≤ 0.1/k·n at p = 0.995 with the top protected (vs up to 1.4/k unprotected). With the
default k = 4096 the dissection threshold's rank is off by ≤ ~2.5e-5·n, i.e. ≤ 0.5% of the q = 0.005 tail.
No compaction happens before k values per unit; until then the answer is the exact order statistic
(torch.quantile with interpolation "lower").
"""

from __future__ import annotations

import math

import torch

from conceptlens.handlers.errors import InvalidInput

DEFAULT_K = 4096
_SHRINK = 2.0 / 3.0
_BOUND_SAMPLE = 4096  # values per unit that the tail sketch's bound is taken from


class QuantileSketch:
    """Streaming quantiles of `units` independent streams. Feed `update((units, n))`, ask `quantile(p)`."""

    def __init__(self, units: int, *, k: int = DEFAULT_K, seed: int = 0, protect_top: bool = True) -> None:
        if units <= 0:
            raise InvalidInput("units", f"must be > 0, got {units}")
        if k < 8:
            raise InvalidInput("k", f"must be >= 8, got {k}")
        self.units, self.k = int(units), int(k)
        self.count = 0  # values seen per unit
        self.levels: list[torch.Tensor] = []  # level h: (units, n_h), each item of weight 2**h
        self._coin = torch.Generator().manual_seed(seed)  # CPU coin flips: no device sync per compaction
        self.compactions = 0
        self.protect_top = protect_top

    def capacity(self, level: int) -> int:
        height = len(self.levels)
        return max(2, math.ceil(self.k * _SHRINK ** (height - 1 - level)))

    @property
    def size(self) -> int:
        """Values held per unit (the memory footprint is units × size)."""
        return sum(level.shape[1] for level in self.levels)

    def update(self, values: torch.Tensor) -> None:
        """Absorb `values` (units, n): n new observations for every unit."""
        if values.dim() != 2 or values.shape[0] != self.units:
            raise InvalidInput("values", f"expected shape ({self.units}, n), got {tuple(values.shape)}")
        if values.shape[1] == 0:
            return
        values = values.detach().float()
        if not self.levels:
            self.levels.append(values.new_empty((self.units, 0)))
        self.levels[0] = torch.cat([self.levels[0], values], dim=1)
        self.count += values.shape[1]
        self._compress()

    def _compress(self) -> None:
        level = 0
        while level < len(self.levels):
            if self.levels[level].shape[1] > self.capacity(level):
                self._compact(level)
            level += 1

    def _compact(self, level: int) -> None:
        items = torch.sort(self.levels[level], dim=1).values
        n = items.shape[1]
        # Only the lower part is compacted; the top `keep` items stay at full resolution (ReqSketch's
        # high-rank-accuracy rule), so the top-q tail that dissection asks for keeps a small *relative* error.
        keep = min(n, max(1, self.capacity(level) // 2)) if self.protect_top else n % 2
        even = (n - keep) - ((n - keep) % 2)
        offset = int(torch.randint(0, 2, (1,), generator=self._coin))
        promoted = items[:, offset:even:2]
        self.levels[level] = items[:, even:]
        if level + 1 == len(self.levels):
            self.levels.append(promoted)
        else:
            self.levels[level + 1] = torch.cat([self.levels[level + 1], promoted], dim=1)
        self.compactions += 1

    def quantile(self, p: float) -> torch.Tensor:
        """Per unit, the value whose rank is floor(p·(n-1)) (0-based, ascending), approximately: shape (units,)."""
        if not 0.0 <= p <= 1.0:
            raise InvalidInput("p", f"must be in [0, 1], got {p}")
        if self.count == 0:
            raise InvalidInput("sketch", "no values seen yet")
        # compaction keeps the total weight equal to the count, so ascending rank r is rank n-1-r from the top
        return self.top_rank((self.count - 1) - math.floor(p * (self.count - 1)))

    def top_rank(self, rank: int) -> torch.Tensor:
        """Per unit, the value with 0-based rank `rank` counted from the largest: shape (units,). Only the
        items above it are summed, so items at the bottom of the sketch (the tail sketch's padding) never count."""
        if self.count == 0:
            raise InvalidInput("sketch", "no values seen yet")
        values = torch.cat(self.levels, dim=1)
        weights = torch.cat([
            torch.full((lvl.shape[1],), float(2**h), device=values.device, dtype=torch.float64)
            for h, lvl in enumerate(self.levels)
        ])
        # every item weighs >= 1, so the answer is among the top rank + 1 items: a partial sort suffices
        top = torch.topk(values, min(values.shape[1], rank + 1), dim=1)
        values, order = top.values, top.indices
        cum = torch.cumsum(weights[order], dim=1)  # (units, m): weight of items >= each sorted item
        idx = torch.searchsorted(cum, torch.full((self.units, 1), float(rank), device=values.device,
                                                 dtype=torch.float64), right=True)
        idx = idx.clamp_(max=values.shape[1] - 1)
        return torch.gather(values, 1, idx).squeeze(1)


class TailSketch:
    """Upper quantiles (p ≥ 1 − `tail`) of `units` streams, sketching only the values that can be the answer.

    Dissection asks one quantile per unit, the top q = 0.005 tail. Values at or below a bound that lies under
    that quantile can never be the answer, so they are only counted. The bound is each unit's exact (1 − tail)
    order statistic in the first update, or in its first ≥ 4096 values per unit when it is bigger (the engine
    uses tail = 8q: a margin for drift between chunks); per
    update only each unit's values above its bound enter a `QuantileSketch`, as one fixed-width block (the
    widest unit's count; shorter units are padded with −inf). Quantiles are then read by rank counted from the
    top, where neither the padding nor the dropped values can sit, so the answer is the one the full sketch
    gives on the same top values, at ~1/tail less sorting (a unit with fewer values above its bound than the
    rank asked, but enough equal to it, answers the bound). `covers(p)` says whether every unit saw enough values
    at or above its bound for the rank asked; it fails only when the first update ran far above the rest, and the
    caller then falls back to a full `QuantileSketch` pass.
    """

    def __init__(self, units: int, *, tail: float, k: int = DEFAULT_K, seed: int = 0) -> None:
        if not 0.0 < tail <= 1.0:
            raise InvalidInput("tail", f"must be in (0, 1], got {tail}")
        self.tail = float(tail)
        self.sketch = QuantileSketch(units, k=k, seed=seed)
        self.units = self.sketch.units
        self.count = 0  # values seen per unit, above the bound or not
        self.bound: torch.Tensor | None = None  # (units,)
        self.above: torch.Tensor | None = None  # (units,) values seen above the bound, exact
        self.at_bound: torch.Tensor | None = None  # (units,) values seen equal to the bound (dead ReLU units: all)
        self.target: tuple[float, int] | None = None  # (p, total) of `aim`

    def update(self, values: torch.Tensor) -> None:
        """Absorb `values` (units, ...): the same number of new observations for every unit. Any view works;
        a contiguous (units, n) one is fastest (the comparisons and `nonzero` run faster than on a strided
        (K, B, h, w) view of activations, more than paying for the copy; bench/README.md)."""
        if values.dim() < 2 or values.shape[0] != self.units:
            raise InvalidInput("values", f"expected shape ({self.units}, n), got {tuple(values.shape)}")
        n = values[0].numel()
        if n == 0:
            return
        if values.dtype != torch.float32:
            values = values.float()
        values = values.detach()
        dims = tuple(range(1, values.dim()))
        if self.bound is None:
            per_row = n // values.shape[1]  # a big first update: a prefix of whole rows is plenty
            self._set_bound(values[:, : math.ceil(_BOUND_SAMPLE / per_row)].reshape(self.units, -1))
        bound = self.bound.view(-1, *([1] * len(dims)))
        # each unit's values above its bound, packed to the left of one -inf padded block; nonzero lists them
        # unit by unit, so a value's slot is its index minus its unit's start (2.5x faster than topk(width))
        where = (values > bound).nonzero(as_tuple=True)
        rows = where[0]
        counts = torch.bincount(rows, minlength=self.units)
        self.above += counts
        self.at_bound += (values == bound).sum(dims, dtype=torch.int32)  # int32: ~30x faster than int64 on CPU
        self.count += n
        width = int(counts.max())
        if width == 0:
            return
        block = _pack(values[where], rows, counts, self.units)
        self._absorb(block)

    def _set_bound(self, sample: torch.Tensor) -> None:
        """The bound: each unit's exact (1 - tail) order statistic of `sample` (units, m)."""
        rank = max(1, math.ceil((1.0 - self.tail) * sample.shape[1]))  # 1-based, ascending
        # the rank-th smallest is the smallest of the top (m - rank + 1): a partial sort, faster than kthvalue
        self.bound = sample.topk(sample.shape[1] - rank + 1, dim=1, sorted=False).values.amin(1)
        self.above = torch.zeros(self.units, dtype=torch.long, device=sample.device)
        self.at_bound = torch.zeros_like(self.above)

    def update_maps(self, acts: torch.Tensor, peak: torch.Tensor) -> None:
        """Absorb activations (B, units, ...) given each map's maximum `peak` (B, units): the values of every map
        count, but only maps whose maximum reaches its unit's bound are scanned. Once `raise_bound` has lifted the
        bounds near the answer that is a small share of the maps (bench/README.md), so the comparisons, the
        `nonzero` and the tie counts run on that share instead of on every value."""
        images, per_map = peak.shape[0], acts[0, 0].numel()
        if self.bound is None:  # from the first images, as `update` takes it from a prefix
            self._set_bound(acts[: math.ceil(_BOUND_SAMPLE / per_map)].transpose(0, 1).reshape(self.units, -1))
        picked = (peak.t() >= self.bound.unsqueeze(1)).flatten().nonzero().squeeze(1)  # unit-major: k·B + b
        unit, image = picked // images, picked % images
        maps = acts.reshape(images * self.units, per_map).index_select(0, image * self.units + unit).float()
        bound = self.bound.index_select(0, unit).unsqueeze(1)
        where = (maps > bound).flatten().nonzero().squeeze(1)  # grouped by unit, like the maps
        rows = unit.index_select(0, where // per_map)
        counts = torch.bincount(rows, minlength=self.units)
        ties = (maps == bound).sum(1, dtype=torch.int32)
        self.above += counts
        self.at_bound += torch.zeros_like(self.at_bound).index_add_(0, unit, ties.long())
        self.count += images * per_map
        width = int(counts.max()) if rows.numel() else 0
        if width == 0:
            return
        block = _pack(maps.view(-1).index_select(0, where), rows, counts, self.units)
        self._absorb(block)

    def aim(self, p: float, total: int) -> None:
        """Say which quantile will be asked and how many values per unit the stream will have: every update then
        raises the bounds towards it (`raise_bound`) before the sketch compacts, keeping it small and exact."""
        self.target = (float(p), int(total))

    def _absorb(self, block: torch.Tensor) -> None:
        """Append a block of values above the bound to the sketch; with a target, prune it (`raise_bound`) while
        it is still exact, then let it compact if it must."""
        sketch = self.sketch
        if not sketch.levels:
            sketch.levels.append(block.new_empty((self.units, 0)))
        sketch.levels[0] = torch.cat([sketch.levels[0], block], dim=1)
        sketch.count += block.shape[1]
        if self.target is not None:
            self.raise_bound(*self.target)
        sketch._compress()

    def raise_bound(self, p: float, total: int) -> None:
        """Lift bounds towards the p-quantile of a stream of `total` values per unit, and drop the kept values
        at or below them: later updates then keep ~(1 - p) of their values instead of `tail`, and the sketch stays
        small enough never to compact. With r the p-quantile's rank from the top among `total` values, a unit
        holding more than r values above its bound lifts it to its (r+1)-th largest held value: the whole stream
        has at least r + 1 values at or above that, so its p-quantile cannot lie below. Only while the sketch is
        exact (no compaction yet: every held value is a real one of weight 1, and the counts against the new
        bound are exact). If the stream ends up longer than `total`, `covers` still guards the answer."""
        if self.bound is None or self.sketch.compactions or len(self.sketch.levels) != 1:
            return
        rank = (total - 1) - math.floor(p * (total - 1))
        held = self.sketch.levels[0]  # (units, m): every value seen above the bound, -inf padded
        if rank < 0 or held.shape[1] <= rank:
            return
        top = held.topk(rank + 1, dim=1, sorted=False).values.amin(1)
        lift = (self.above > rank) & (top > self.bound)
        if not bool(lift.any()):
            return
        bound = torch.where(lift, top, self.bound).unsqueeze(1)
        keep = held > bound
        counts = keep.sum(1, dtype=torch.int32).long()
        self.at_bound = torch.where(lift, (held == bound).sum(1, dtype=torch.int32).long(), self.at_bound)
        self.above = torch.where(lift, counts, self.above)
        self.bound = bound.squeeze(1)
        rows, cols = keep.nonzero(as_tuple=True)
        block = _pack(held[rows, cols], rows, counts, self.units)
        self.sketch.levels[0] = block
        self.sketch.count = block.shape[1]

    def _rank_from_top(self, p: float) -> int:
        return (self.count - 1) - math.floor(p * (self.count - 1))

    def covers(self, p: float) -> bool:
        """True when every unit's p-quantile lies above its bound, so `quantile(p)` is the sketch's answer."""
        if self.count == 0 or self.above is None:
            return False
        return bool((self.above + self.at_bound > self._rank_from_top(p)).all())

    def quantile(self, p: float) -> torch.Tensor:
        """Per unit, the value whose ascending rank is floor(p·(n-1)), as `QuantileSketch.quantile`: (units,)."""
        if not 0.0 <= p <= 1.0:
            raise InvalidInput("p", f"must be in [0, 1], got {p}")
        if not self.covers(p):
            raise InvalidInput("p", f"quantile {p} is below the values this tail sketch kept (tail {self.tail})")
        rank = self._rank_from_top(p)
        if self.sketch.count == 0:  # nothing ever rose above the bound: the answer is the bound itself
            return self.bound.clone()
        return torch.where(self.above > rank, self.sketch.top_rank(rank), self.bound)


def _pack(values: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, units: int) -> torch.Tensor:
    """Values listed unit by unit (`rows` ascending, `counts` per unit) -> one (units, max count) block, each
    unit's values packed to the left and -inf after: a value's slot is its index minus its unit's start."""
    slot = torch.arange(rows.numel(), device=values.device) - (torch.cumsum(counts, 0) - counts)[rows]
    block = values.new_full((units, int(counts.max()) if rows.numel() else 0), float("-inf"))
    block[rows, slot] = values
    return block
