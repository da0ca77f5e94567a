"""Influence tracing pieces that need no bundle: the closed form, the summary sentence, plausibility and which
architectures get the exact last-layer path."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from conceptlens.handlers.backends import _linear_head
from conceptlens.handlers.bundle import LayerInfo, UnitInfo
from conceptlens.handlers.hooks import override
from conceptlens.handlers.trace import LayerTrace, UnitTrace, last_layer_deltas, plausibility, summarize
from conceptlens.handlers.zoo import build_model


def _info(name: str, units: int) -> dict[str, LayerInfo]:
    return {name: LayerInfo(name, units, [0.0] * units, [UnitInfo(i) for i in range(units)])}


def test_closed_form_equals_ablation_on_a_small_cnn():
    torch.manual_seed(0)
    model = build_model("small_cnn", ["a", "b", "c"], input_size=16).eval()
    x = torch.rand(1, 3, 16, 16)
    head = _linear_head(model, _info("layer3", 128))
    acts = {}
    with torch.no_grad():
        hook = model.net.layer3.register_forward_hook(lambda _m, _i, out: acts.setdefault("a", out))
        logits = model(x)
        hook.remove()
    baselines = np.linspace(0, 0.2, 128, dtype=np.float32)
    deltas = last_layer_deltas(acts["a"][0].numpy(), head.weight[1], baselines)
    for k in (0, 7, 127):
        def fn(out, k=k):
            out = out.clone()
            out[:, k] = float(baselines[k])
            return out

        with torch.no_grad(), override(model, "layer3", fn):
            ablated = model(x)[0, 1]
        assert deltas[k] == pytest.approx(float(logits[0, 1] - ablated), abs=1e-5)


def test_only_gap_plus_linear_heads_get_the_closed_form():
    assert _linear_head(build_model("small_cnn", ["a", "b"]), _info("layer3", 128)) is not None
    assert _linear_head(build_model("small_cnn", ["a", "b"]), _info("layer2", 64)) is None  # not the last layer
    mobilenet = build_model("mobilenet_v3_small", ["a", "b"])  # its head is an MLP: hidden-layer path
    assert _linear_head(mobilenet, _info("features.12", 576)) is None


def _unit(k: int, delta: float, concept: str = "", iou: float = 0.0) -> UnitTrace:
    return UnitTrace("layer3", k, delta, True, 1.0, 0.0, concept, "part" if concept else "", iou, bool(concept))


def test_summary_sentence():
    layer = LayerTrace("layer3", [_unit(3, 2.0, "wheel", 0.31), _unit(9, 1.0, "window", 0.22), _unit(4, 0.5)],
                       0.71, "exact-last-layer")
    assert summarize("car", layer) == "car: units for wheel (IoU .31) and window (IoU .22) carried 71% of the score"
    unnamed = LayerTrace("layer3", [_unit(3, 2.0), _unit(5, 1.0)], 0.4, "suffix-rerun")
    assert summarize("car", unnamed) == "car: layer3 units 3 and 5 carried 40% of the score"


def test_plausibility_weighs_concepts_by_influence():
    manifest = types.SimpleNamespace(cooccurrence={"wheel": {"car": 0.8, "boat": 0.0},
                                                   "sail": {"car": 0.1, "boat": 0.5}})
    runtime = types.SimpleNamespace(manifest=manifest)
    units = [_unit(1, 3.0, "wheel"), _unit(2, 1.0, "sail"), _unit(3, -5.0, "sail"), _unit(4, 2.0)]
    # wheel goes with car fully (0.8/0.8), sail a fifth (0.1/0.5); negative and unlabelled units carry no weight
    assert plausibility(runtime, units, "car") == pytest.approx((3 * 1.0 + 1 * 0.2) / 4)
    assert plausibility(runtime, units, "boat") == pytest.approx((3 * 0.0 + 1 * 1.0) / 4)
    assert plausibility(types.SimpleNamespace(manifest=types.SimpleNamespace(cooccurrence={})), units, "car") is None


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_hidden_layer_inside_a_torchvision_block_matches_a_full_rerun(tmp_path):
    """layer3.0.bn1 feeds an in-place ReLU: the trace must still see (and ablate) the unmodified activation."""
    from conceptlens.handlers.backends import ModelRuntime
    from conceptlens.handlers.bundle import load_bundle
    from conceptlens.handlers.trace import TraceOptions, trace_image
    from conceptlens.training.export import export_bundle

    torch.manual_seed(0)
    model = build_model("resnet18", ["a", "b", "c"], input_size=32)
    with torch.no_grad():
        model.train()
        model(torch.rand(8, 3, 32, 32))
    model.eval()
    bundle = export_bundle(model, tmp_path / "r" / "1", name="r", version=1, layers=["layer3.0.bn1", "layer4"])
    runtime = ModelRuntime(load_bundle(bundle, verify_onnx=False), device="cpu")
    x = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    out = runtime.forward(x[None])
    acts = {name: a[0] for name, a in out.activations.items()}
    result = trace_image(runtime, x, out.logits[0], acts,
                         TraceOptions(layers=["layer3.0.bn1", "layer4"], top_k_units=3, candidates=8, depth=2))
    c = result.target
    xt = torch.from_numpy(x[None])
    with torch.no_grad():
        f = float(model(xt)[0, c])
    for unit in result.layers[0].units:
        def fn(o, k=unit.unit):
            o = o.clone()
            o[:, k] = 0.0  # exported without a dissection: baselines are 0
            return o

        with torch.no_grad(), override(model, "layer3.0.bn1", fn):
            assert unit.delta == pytest.approx(f - float(model(xt)[0, c]), abs=1e-4)
    assert all(len(u.contributors) == 3 for u in result.layers[1].units)
