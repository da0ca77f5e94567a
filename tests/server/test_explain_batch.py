"""The batched last-layer trace (what Explain runs for the default request) gives exactly what the per-image
trace gives: the same units, Δ, activations, shares, plausibility, flags, summaries and maps, image by image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.handlers.trace import TraceOptions, trace_image, trace_last_layer, unit_table


@pytest.fixture(scope="module")
def runtime(bundle_dir) -> ModelRuntime:
    return ModelRuntime(load_bundle(bundle_dir, verify_onnx=False), device="cpu")


@pytest.mark.parametrize("options", [
    TraceOptions(layers=("layer3",)),
    TraceOptions(layers=("layer3",), top_k_units=9, target=2),
    TraceOptions(layers=("layer3",), top_k_units=3, include_maps=True, map_size=8),
    TraceOptions(layers=("layer3",), top_k_units=128, include_maps=True),
], ids=["default", "target", "maps-resized", "all-units-native-maps"])
def test_batch_equals_per_image_trace(runtime, options):
    x = np.random.default_rng(1).random((7, 3, 32, 32), dtype=np.float32)
    out = runtime.forward(x)
    acts = out.activations["layer3"]
    means = acts.mean(axis=(2, 3))
    batch = trace_last_layer(runtime, out.logits, acts, means, options, plausibility_threshold=0.6)
    assert len(batch) == len(x)
    for i, got in enumerate(batch):
        want = trace_image(runtime, x[i], out.logits[i], {"layer3": acts[i]}, options, plausibility_threshold=0.6,
                           means={"layer3": means[i]})
        maps_got = [u.map for u in got.layers[0].units]
        maps_want = [u.map for u in want.layers[0].units]
        for a, b in zip(maps_got, maps_want, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)
        strip = [dataclasses.replace(u, map=None) for u in got.layers[0].units]
        assert strip == [dataclasses.replace(u, map=None) for u in want.layers[0].units]
        assert (got.target, got.plausibility, got.adversarial, got.summary, got.layers[0].share) == \
            (want.target, want.plausibility, want.adversarial, want.summary, want.layers[0].share)
    if options.top_k_units >= 128:  # every unit: some carry a concept of the made-up dissection and are present
        assert any(t.plausibility is not None for t in batch)


def test_batch_trace_refuses_what_it_cannot_do_exactly(runtime):
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)
    out = runtime.forward(x)
    a = out.activations["layer2"]
    for options in (TraceOptions(layers=("layer2",)), TraceOptions(layers=("layer2", "layer3"), depth=2)):
        with pytest.raises(ValueError, match="trace_image"):
            trace_last_layer(runtime, out.logits, a, a.mean(axis=(2, 3)), options)


def test_unit_table_is_built_once_per_runtime(runtime):
    table = unit_table(runtime, "layer3")
    assert unit_table(runtime, "layer3") is table
    infos = runtime.layers["layer3"].units_info
    assert table.labels == [u.label for u in infos] and len(table.plaus) == len(infos)
    assert all((w is None) == (not u.label) for w, u in zip(table.plaus, infos, strict=True))


def test_concept_hits_add_up_and_stay_bounded(monkeypatch):
    """Explain counts concept hits through cached label children; past the cap new concepts count as "other"."""
    from conceptlens.server import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "MAX_CONCEPTS", 2)
    m = metrics_module.Metrics()
    for concept, count in (("wheel", 3), ("wheel", 1), ("sail", 1), ("leaf", 2), ("red", 1), ("sail", 2)):
        m.concept_hit("small", concept, count)

    def value(concept: str) -> float | None:
        return m.registry.get_sample_value("conceptlens_concept_hits_total", {"model": "small", "concept": concept})

    assert (value("wheel"), value("sail"), value("other"), value("leaf")) == (4, 3, 3, None)
