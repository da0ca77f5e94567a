"""The per-unit quantile sketch: exact on short streams, bounded error and memory through many compactions."""

from __future__ import annotations

import pytest
import torch

from conceptlens.handlers.errors import InvalidInput
from conceptlens.training.dissect.quantile import QuantileSketch, TailSketch


def _rank_error(values: torch.Tensor, estimate: torch.Tensor, p: float) -> float:
    """Worst unit's |rank(estimate) − p·(n−1)| / n."""
    n = values.shape[1]
    below = (values < estimate[:, None]).sum(1).double()
    at_or_below = (values <= estimate[:, None]).sum(1).double()
    target = p * (n - 1)
    # the estimate occupies ranks [below, at_or_below - 1]; distance from the target to that range
    err = torch.clamp(below - target, min=0) + torch.clamp(target - (at_or_below - 1), min=0)
    return float(err.max() / n)


def test_short_stream_is_exact_like_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 3000, generator=gen) * torch.arange(1, 6).view(5, 1)
    sketch = QuantileSketch(5, k=4096)
    for chunk in values.split(700, dim=1):
        sketch.update(chunk)
    assert sketch.compactions == 0
    for p in (0.0, 0.5, 0.995, 1.0):
        expected = torch.quantile(values, p, dim=1, interpolation="lower")
        assert torch.equal(sketch.quantile(p), expected), p


@pytest.mark.parametrize("protect_top", [True, False])
def test_long_stream_compacts_and_keeps_rank_error_and_memory_bounded(protect_top):
    gen = torch.Generator().manual_seed(1)
    k, units = 128, 3
    sketch = QuantileSketch(units, k=k, seed=3, protect_top=protect_top)
    chunks = []
    for i in range(200):  # 200·300 = 60000 values per unit ≈ 470·k: many compactions at many levels
        chunk = torch.randn(units, 300, generator=gen) * (1 + i % 4) + (i % 7)  # drifting, non-stationary
        chunks.append(chunk)
        sketch.update(chunk)
        assert sketch.size <= 3 * k + 2 * len(sketch.levels)  # memory independent of the stream length
    values = torch.cat(chunks, dim=1)
    assert sketch.count == values.shape[1]
    assert sketch.compactions > 100 and len(sketch.levels) >= 5
    for p in (0.1, 0.5, 0.9, 0.995):
        assert _rank_error(values, sketch.quantile(p), p) <= 2.5 / k, p  # documented ε ≈ 2/k
    if protect_top:  # the top tail, where dissection reads its thresholds, is much tighter
        assert _rank_error(values, sketch.quantile(0.995), 0.995) <= 0.25 / k


def test_sketch_stays_on_the_values_device_and_rejects_bad_input():
    sketch = QuantileSketch(2, k=16)
    sketch.update(torch.arange(40.0).view(2, 20))
    assert all(level.device == torch.device("cpu") for level in sketch.levels)
    with pytest.raises(InvalidInput, match="values"):
        sketch.update(torch.zeros(3, 4))
    with pytest.raises(InvalidInput, match="p"):
        sketch.quantile(1.5)
    with pytest.raises(InvalidInput, match="no values"):
        QuantileSketch(2).quantile(0.5)


def test_tail_sketch_is_exact_on_short_streams_and_sorts_only_the_tail():
    gen = torch.Generator().manual_seed(4)
    values = torch.relu(torch.randn(6, 20000, generator=gen)) * torch.arange(1, 7).view(6, 1)
    values[2] = 0.0  # a dead unit: every value ties with its bound
    tail = TailSketch(6, tail=0.04, k=4096)
    for chunk in values.split(2500, dim=1):
        tail.update(chunk)
    assert tail.count == values.shape[1] and tail.covers(0.995)
    assert tail.sketch.count < 0.1 * values.shape[1]  # the sketch saw ~4% of the values, plus padding
    expected = torch.quantile(values, 0.995, dim=1, interpolation="lower")
    assert torch.equal(tail.quantile(0.995), expected)


@pytest.mark.parametrize("told", [20000, 12000])
def test_raised_tail_bounds_keep_the_exact_quantile_with_ties_and_dead_units(told):
    """raise_bound lifts each unit's bound to its (r+1)-th largest held value once it holds more than r: the
    answer stays the exact order statistic, ties included. Told 12000 of a 20000-value stream, its bounds may sit
    too high for the real rank: `covers` must then say so rather than answer wrong."""
    gen = torch.Generator().manual_seed(6)
    values = (torch.relu(torch.randn(5, 20000, generator=gen)) * 20).round() / 20  # coarse: many ties
    values[3] = 0.0  # a dead unit
    values[4, :19950] = 0.0  # a sparse unit: under 50 non-zero values, fewer than the 0.995 rank (100) needs
    tail = TailSketch(5, tail=0.04, k=4096)
    tail.aim(0.995, told)  # every update raises the bounds before the sketch could compact
    for chunk in values.split(2500, dim=1):
        tail.update(chunk)
    assert tail.sketch.compactions == 0 and tail.sketch.levels[0].shape[1] < 0.3 * 0.04 * 20000  # pruned
    expected = torch.quantile(values, 0.995, dim=1, interpolation="lower")
    if tail.covers(0.995):
        assert torch.equal(tail.quantile(0.995), expected)
    else:
        assert told < values.shape[1]


def test_map_screened_updates_count_and_answer_like_full_updates():
    """update_maps scans only maps whose maximum reaches the bound; its counts and answers must equal update's."""
    gen = torch.Generator().manual_seed(7)
    acts = (torch.relu(torch.randn(12, 32, 5, 6, 6, generator=gen)) * 10).round() / 10  # chunks of (32, 5, 6, 6)
    acts[:, :, 2] = 0.0  # a dead unit
    full, screened = TailSketch(5, tail=0.04), TailSketch(5, tail=0.04)
    for sketch in (full, screened):
        sketch.aim(0.995, acts[:, :, 0].numel())
    for chunk in acts:
        full.update(chunk.transpose(0, 1).reshape(5, -1))
        screened.update_maps(chunk, chunk.amax((2, 3)))
        assert torch.equal(full.above, screened.above) and torch.equal(full.at_bound, screened.at_bound)
    values = acts.transpose(0, 2).reshape(5, -1)
    assert screened.covers(0.995)
    expected = torch.quantile(values, 0.995, dim=1, interpolation="lower")
    assert torch.equal(screened.quantile(0.995), expected) and torch.equal(full.quantile(0.995), expected)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_tail_sketch_keeps_the_full_sketchs_error_through_compactions():
    gen = torch.Generator().manual_seed(5)
    k, units = 128, 3
    tail, chunks = TailSketch(units, tail=0.04, k=k, seed=3), []
    for i in range(200):
        chunk = torch.randn(units, 3000, generator=gen) * (1 + i % 4) + (i % 7)  # drifting, non-stationary
        chunks.append(chunk)
        tail.update(chunk)
    values = torch.cat(chunks, dim=1)
    assert tail.sketch.compactions > 10 and tail.covers(0.995)
    assert _rank_error(values, tail.quantile(0.995), 0.995) <= 0.25 / k


def test_tail_sketch_reports_when_its_first_update_set_the_bound_too_high():
    tail = TailSketch(2, tail=0.04)
    tail.update(torch.full((2, 100), 10.0) + torch.arange(100.0))  # the first batch is far above the rest
    for _ in range(50):
        tail.update(torch.rand(2, 100))
    assert not tail.covers(0.995)
    with pytest.raises(InvalidInput, match="below the values"):
        tail.quantile(0.995)
