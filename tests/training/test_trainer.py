"""The trainer end to end on tiny ShapesWorld data: the three regimes, the files a run leaves, load_run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlens.handlers.errors import InvalidInput
from conceptlens.training import config as cfg
from conceptlens.training.data.registry import open_dataset
from conceptlens.training.run import load_run
from conceptlens.training.trainer import train

TINY = [
    "data.train=shapes:64", "data.val=shapes:32", "data.batch_size=16", "model.input_size=32", "run.epochs=1",
    "attack.steps=1", "eval.robust_n=16", "eval.steps=1", "eval.batch_size=32", "run.progress=false",
]


def tiny(*extra: str) -> cfg.TrainConfig:
    return cfg.load(None, [*TINY, *extra])


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize(
    ("overrides", "regime"),
    [
        (["attack.name=none", "optim.name=adamw", "optim.lr=0.003", "optim.schedule=step"], "standard"),
        (["loss.consistency_weight=0", "loss.adv_weight=0.5", "optim.schedule=onecycle"], "adversarial"),
        (["loss.consistency_weight=2", "loss.distance=cosine"], "consistent"),
    ],
)
@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_three_regimes_log_every_term(tmp_path: Path, overrides: list[str], regime: str) -> None:
    config = tiny(*overrides)
    assert config.regime == regime
    run = train(config, tmp_path / "run")
    steps = records(run, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    alpha, lam = config.loss.adv_weight, config.loss.consistency_weight
    for r in steps:
        assert r["loss"] == pytest.approx(r["ce_clean"] + alpha * r["ce_adv"] + lam * r["consistency"], rel=1e-5)
        if regime == "standard":
            assert r["ce_adv"] == 0 and r["consistency"] == 0
        else:
            assert r["ce_adv"] > 0
        if regime == "consistent":
            assert r["consistency"] > 0
            assert r["consistency"] == pytest.approx(r["consistency/layer2"] + r["consistency/layer3"], rel=1e-5)
        else:
            assert r["consistency"] == 0
    epochs = records(run, "epoch")
    assert len(epochs) == 1 and 0 <= epochs[0]["clean_accuracy"] <= 1
    assert epochs[0]["robust_accuracy"] is not None

    meta = json.loads((run / "run.json").read_text())
    assert meta["regime"] == regime and meta["lambda"] == lam
    assert meta["layers"] == ["layer2", "layer3"] and meta["input"]["size"] == 32
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["loss"]["layers"] == ["layer2", "layer3"]
    assert (run / "checkpoints" / "last.pt").is_file()

    model = load_run(run)
    val = open_dataset("shapes:32", "val", size=32)
    images = torch.stack([val[i][0] for i in range(32)])
    labels = torch.tensor([val[i][1] for i in range(32)])
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(epochs[0]["clean_accuracy"])  # the saved weights are the evaluated ones


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(InvalidInput, match="--resume"):
        train(tiny("attack.name=none"), run)


def test_bad_data_spec_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        train(tiny("data.train=imagefolder:/nonexistent/x"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("attack", ["fgsm", "ghost-ensemble"])
@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_other_library_attacks_make_x_star(tmp_path: Path, attack: str) -> None:
    run = train(tiny(f"attack.name={attack}", "attack.ghost_members=2", "data.train=shapes:32"), tmp_path / "run")
    steps = records(run, "step")
    assert steps and all(r["ce_adv"] > 0 and r["consistency"] > 0 for r in steps)
