"""The CSG regime's pieces (training/csg.py): the L1 hinge sparsity loss, the renormalise-and-clip step, the gate
hook, and gating that exists in training only (the trained model carries no gate and needs no label)."""

from __future__ import annotations

import pytest
import torch

from conceptlens.handlers.zoo import build_model
from conceptlens.training import checkpoint
from conceptlens.training.config import load as load_config
from conceptlens.training.csg import ClassGate, gated
from conceptlens.training.run import load_run
from conceptlens.training.trainer import train


def test_sparsity_loss_is_the_l1_hinge():
    gate = ClassGate(4, 10)  # starts open: ‖G‖₁ = 40, |G| = 40
    assert gate.sparsity_loss(0.2).item() == pytest.approx(40 - 0.2 * 40)
    gate.sparsity_loss(0.2).backward()
    assert torch.all(gate.weight.grad == 1)  # d‖G‖₁/dG = sign(G) while the hinge is active
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, :8] = 1.0  # 8 of 40 open = exactly the allowed 20%
    assert gate.sparsity_loss(0.2).item() == 0.0
    with torch.no_grad():
        gate.weight[1, 0] = 1.0
    assert gate.sparsity_loss(0.2).item() == pytest.approx(1.0)


def test_renormalize_scales_each_filter_by_its_max_over_classes_and_clips():
    gate = ClassGate(3, 2)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[0.5, 2.0], [0.25, -1.0], [0.1, 1.0]]))
    gate.renormalize_()
    assert torch.allclose(gate.weight, torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.2, 0.5]]))
    assert gate.density() == pytest.approx(3.2 / 6)


def test_the_gate_multiplies_each_sample_by_its_class_row_and_is_removed_afterwards():
    torch.manual_seed(0)
    model = build_model("small_cnn", ["a", "b", "c"], input_size=16).eval()
    gate = ClassGate(3, 128)
    with torch.no_grad():
        gate.weight[1] = 0.0  # class b closes every filter of layer3: its logits fall back to the bias
    x, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    with torch.no_grad():
        plain = model(x)
        with gated(model, "layer3", gate, labels):
            out = model(x)
        after = model(x)
    assert torch.allclose(out[0], plain[0])  # class a's row is all ones
    assert torch.allclose(out[1], model.net.fc.bias)
    assert torch.allclose(after, plain)  # the hook is gone


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_gating_happens_in_training_only(tmp_path):
    overrides = ["data.train=shapes:32", "data.val=shapes:16", "data.batch_size=16", "model.input_size=32",
                 "run.epochs=2", "attack.name=none", "eval.robust_n=0", "run.progress=false",
                 "loss.csg_weight=0.5"]
    run = train(load_config(None, overrides), tmp_path / "run")
    payload = checkpoint.load(run / checkpoint.CHECKPOINT_DIR / checkpoint.LAST)
    gate = payload["extra"]["csg_gate"]
    assert gate.shape == (9, 128) and float(gate.min()) >= 0 and float(gate.max()) <= 1
    assert float(gate.mean()) < 1.0  # the sparsity loss closed part of the gate in the gated epoch
    model = load_run(run)  # the trained model is the plain architecture: no gate parameters
    plain = build_model("small_cnn", model.classes, input_size=32)
    assert set(model.state_dict()) == set(plain.state_dict())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (3, 9)  # inference needs no label


def test_bad_csg_settings_are_refused():
    from conceptlens.handlers.errors import InvalidInput
    from conceptlens.training.config import validate

    validate(load_config(None, ["loss.csg_weight=1"]))
    with pytest.raises(InvalidInput, match="csg"):
        validate(load_config(None, ["loss.csg_weight=-1"]))
    with pytest.raises(InvalidInput, match="csg"):
        validate(load_config(None, ["loss.csg_weight=1", "loss.csg_sparsity=0"]))
