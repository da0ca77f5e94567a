"""`handlers.probe.probe` called directly, without a server, on the embedded ShapesWorld bundle (models/shapes/1,
ONNX Runtime and torch as served): a fixed-ε probe is the catalogue's PGD and stays in its ball, the unit changes
are the largest |Δ_adv − Δ_clean| first, a range probe reports minimal ε inside the range, Square needs no
gradient, ensemble members join the ghosts, and `check` stops a probe between attack steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlens.handlers.attacks import PGD
from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.handlers.probe import ProbeSpec, build_attack, probe
from conceptlens.handlers.trace import TraceOptions
from conceptlens.training.data.shapes import ShapesWorld

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "shapes" / "1"
EPS = 8 / 255


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return ModelRuntime(load_bundle(BUNDLE, verify_onnx=False), threads=1)


@pytest.fixture(scope="module")
def images(runtime) -> np.ndarray:
    data = ShapesWorld(2, size=runtime.input_size, seed=424_242)
    return np.stack([data[i][0].numpy() for i in range(2)]).astype(np.float32)


def test_fixed_eps_probe_is_the_catalogue_pgd(runtime, images) -> None:
    spec = ProbeSpec("pgd", eps=EPS, steps=3, random_start=False)
    options = TraceOptions(layers=["layer3"], top_k_units=3)
    out = probe(runtime, images, spec, options)
    clean = runtime.forward(images).logits
    labels = torch.from_numpy(clean.argmax(1)).long()
    library = PGD(runtime.torch_model, eps=EPS, steps=3, random_start=False)(torch.from_numpy(images), labels)
    assert len(out) == len(images)
    for i, item in enumerate(out):
        assert np.abs(item.adversarial - images[i]).max() <= EPS + 1e-6
        assert np.allclose(item.adversarial, library.adv[i].numpy(), atol=1e-6)
        assert item.flipped == bool(library.success[i]) == (item.adversarial_logits.argmax() != clean[i].argmax())
        assert item.min_eps == (pytest.approx(EPS) if item.flipped else None)
        assert np.allclose(item.perturbation, np.abs(item.adversarial - images[i]).max(axis=0))
        moved = [abs(c.adversarial_delta - c.clean_delta) for c in item.changes]
        assert len(item.changes) == 3 and moved == sorted(moved, reverse=True)
        assert {c.layer for c in item.changes} == {"layer3"}
        assert item.clean_trace is not None and item.adversarial_trace is not None


def test_range_probe_reports_minimal_eps_inside_the_range(runtime, images) -> None:
    spec = ProbeSpec("fgsm", eps=None, eps_range=(0.0, 0.2), tolerance=0.02, steps=1)
    out = probe(runtime, images[:2], spec, TraceOptions(layers=["layer3"], top_k_units=1))
    for image, item in zip(images, out, strict=False):
        if item.flipped:
            assert 0.0 < item.min_eps <= 0.2
            assert np.abs(item.adversarial - image).max() <= item.min_eps + 1e-6
        else:
            assert item.min_eps is None


def test_square_queries_only_the_onnx_session(runtime, images) -> None:
    spec = ProbeSpec("square", eps=EPS, steps=20, seed=1)
    atk = build_attack(runtime, spec, EPS, search=False)
    assert atk.model is not runtime.torch_model  # a logits function over the ONNX session
    out = probe(runtime, images[:1], spec, TraceOptions(layers=["layer3"], top_k_units=2))
    assert np.abs(out[0].adversarial - images[0]).max() <= EPS + 1e-6


def test_ensemble_members_join_the_ghosts(runtime) -> None:
    other = ModelRuntime(load_bundle(BUNDLE, verify_onnx=False), threads=1)
    atk = build_attack(runtime, ProbeSpec("ghost-ensemble", eps=EPS, ghosts=2, members=(other,)), EPS, search=False)
    assert len(atk.source.members) == 3 and atk.source.members[-1] is other.torch_model
    assert atk.model is runtime.torch_model  # success is judged on the probed model


def test_check_stops_the_probe_between_attack_steps(runtime, images) -> None:
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise TimeoutError("deadline")

    with pytest.raises(TimeoutError):
        probe(runtime, images[:1], ProbeSpec("pgd", eps=EPS, steps=50), TraceOptions(layers=["layer3"]), check=check)
    assert len(calls) == 2
