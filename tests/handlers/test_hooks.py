"""capture() and override() leave no hook behind, after normal runs and when a layer raises (Captum's check)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conceptlens.handlers.errors import UnknownName
from conceptlens.handlers.hooks import capture, override
from conceptlens.handlers.zoo import build_model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def model() -> nn.Module:
    return build_model("small_cnn", [f"c{i}" for i in range(4)], input_size=16).eval()


def test_capture_records_and_removes(model: nn.Module) -> None:
    x = torch.rand(2, 3, 16, 16)
    with capture(model, ["layer1", "layer3"], detach=True) as acts:
        assert _hook_count(model) == 2
        model(x)
    assert acts["layer1"].shape == (2, 32, 8, 8) and acts["layer3"].shape == (2, 128, 2, 2)
    assert not acts["layer3"].requires_grad
    assert _hook_count(model) == 0


def test_override_changes_output_and_removes(model: nn.Module) -> None:
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        clean = model(x)
        with override(model, "layer3", torch.zeros_like):
            zeroed = model(x)
        after = model(x)
    # With layer3 zeroed the logits are the head's bias for every input.
    assert torch.allclose(zeroed, model.net.fc.bias.expand_as(zeroed))
    assert torch.equal(after, clean)
    assert _hook_count(model) == 0


class Boom(RuntimeError):
    pass


def _raise(*_args: object) -> None:
    raise Boom("layer failed")


@pytest.mark.parametrize("use", ["capture", "override"])
def test_hooks_removed_when_a_layer_raises(model: nn.Module, use: str) -> None:
    failing = model.net.layer2.register_forward_hook(_raise)  # a layer that raises mid-forward
    try:
        ctx = capture(model, ["layer1", "layer3"]) if use == "capture" else override(model, "layer3", torch.neg)
        with pytest.raises(Boom), ctx:
            model(torch.rand(1, 3, 16, 16))
    finally:
        failing.remove()
    assert _hook_count(model) == 0


def test_hooks_removed_when_a_later_name_is_unknown(model: nn.Module) -> None:
    with pytest.raises(UnknownName, match="layer1"), capture(model, ["layer1", "nope"]):
        pass
    assert _hook_count(model) == 0
