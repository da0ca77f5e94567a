"""`conceptlens train` / `conceptlens evaluate` through the real dispatcher: validation first, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptlens.cli import main

TINY = ["--data", "shapes:32", "--val-data", "shapes:16", "--batch-size", "16", "--epochs", "1",
        "--set", "model.input_size=32", "--set", "eval.robust_n=8", "--set", "eval.steps=1", "--no-progress"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--arch", "not_an_arch"], "small_cnn"),
        (["--layers", "layer9"], "layer3"),
        (["--optimizer", "rmsprop"], "adamw"),
        (["--schedule", "poly"], "cosine"),
        (["--attack", "cw"], "ghost-ensemble"),
        (["--data", "imagefolder:/no/such/dir"], "does not exist"),
        (["--data", "mnist:/x"], "shapes"),
        (["--eps", "eight"], "8/255"),
        (["--set", "loss.lambda=1"], "consistency_weight"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path: Path, capsys, args: list[str], named: str) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and err.startswith("conceptlens train: error:")
    assert not (out / "metrics.jsonl").exists()


def test_out_or_resume_is_required(capsys) -> None:
    assert main(["train", *TINY]) == 2
    assert "--out" in capsys.readouterr().err


def test_resume_refuses_new_options(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_train_then_evaluate_json(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--attack", "none", "--out", str(run), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["regime"] == "standard" and meta["architecture"] == "small_cnn" and len(meta["classes"]) >= 8

    assert main(["evaluate", "--model", str(run), "--data", "shapes:16", "--eps", "4/255", "--steps", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 16 and result["robust_n"] == 16
    assert 0 <= result["robust_accuracy"] <= 1 and set(result["per_class"]) == set(meta["classes"])

    assert main(["evaluate", "--model", str(run), "--data", "shapes:16", "--steps", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("clean accuracy") and "robust accuracy" not in text

    # a bundle exported from the run evaluates to the same numbers as the run itself
    from conceptlens.training.export import export_bundle
    from conceptlens.training.run import load_run

    bundle = export_bundle(load_run(run), tmp_path / "repo" / "tiny" / "1", name="tiny", version=1)
    assert main(["evaluate", "--model", str(bundle), "--data", "shapes:16", "--eps", "4/255", "--steps", "2",
                 "--json"]) == 0
    from_bundle = json.loads(capsys.readouterr().out)
    assert from_bundle["clean_accuracy"] == result["clean_accuracy"]
    assert from_bundle["robust_accuracy"] == result["robust_accuracy"]


def test_evaluate_rejects_a_directory_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--model", str(tmp_path), "--data", "shapes:4"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
