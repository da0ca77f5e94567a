"""`model.init_weights`: the trainer starts from an imported model's weights, so the loss of its first step is
the imported model's loss on that batch (and not a random initialisation's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conceptlens.handlers.errors import InvalidInput
from conceptlens.training import config as cfg
from conceptlens.training.cli_import import import_run
from conceptlens.training.data.shapes import SHAPES_CLASSES
from conceptlens.training.run import load_run
from conceptlens.training.trainer import open_data, train

pytestmark = pytest.mark.slow  # two one-step training runs: ~20 s of CPU, more on a shared machine

# one step: the whole training set is one batch, so the step-1 loss does not depend on the sampler's order
ONE_STEP = ["data.train=shapes:16", "data.val=shapes:16", "data.batch_size=16", "model.input_size=32",
            "model.arch=resnet18", "run.epochs=1", "run.log_every=1", "attack.name=none", "eval.robust_n=0",
            "run.progress=false"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None, num_classes=len(SHAPES_CLASSES))
    with torch.no_grad():  # a confident head, so its loss is far from a random initialisation's ~ln 9
        net.fc.bias.copy_(torch.linspace(-6, 6, len(SHAPES_CLASSES)))
    torch.save(net.state_dict(), root / "r18.pth")
    import_run("resnet18", root / "r18.pth", list(SHAPES_CLASSES), root / "run", input_size=32)
    return root / "run"


def _first_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "step" and r["step"] == 1)["ce_clean"]


def test_step_zero_loss_is_the_imported_models_loss(imported, tmp_path):
    config = cfg.load(None, [*ONE_STEP, f"model.init_weights={imported}"])
    run = train(config, tmp_path / "fine")
    train_set = open_data(config)[0]
    images = torch.stack([train_set[i][0] for i in range(len(train_set))])
    labels = torch.tensor([train_set[i][1] for i in range(len(train_set))])
    model = load_run(imported).train()  # the trainer's forward runs in train mode (batch statistics)
    with torch.no_grad():
        expected = F.cross_entropy(model(images), labels).item()
    assert _first_loss(run) == pytest.approx(expected, rel=1e-4)
    scratch = train(cfg.load(None, ONE_STEP), tmp_path / "scratch")
    assert _first_loss(scratch) != pytest.approx(expected, rel=1e-2)  # the check can tell the two apart


def test_init_weights_of_another_architecture_is_refused_before_training(imported, tmp_path):
    config = cfg.load(None, [*ONE_STEP, "model.arch=resnet34", f"model.init_weights={imported}"])
    with pytest.raises(InvalidInput, match=r"model\.init_weights: .* holds a resnet18, the config trains a resnet34"):
        train(config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
