"""The commands end to end: train a tiny run, dissect it on a Broden directory, export it with the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptlens.cli import main
from conceptlens.handlers.bundle import load_bundle
from conceptlens.training.data.broden import write_broden
from conceptlens.training.data.shapes import ShapesWorld


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--out", str(out), "--data", "shapes:48", "--val-data", "shapes:16", "--epochs", "1",
                 "--batch-size", "16", "--attack", "none", "--set", "model.input_size=32",
                 "--set", "eval.robust_n=0", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    return write_broden(ShapesWorld(24, size=32, seed=4), tmp_path_factory.mktemp("broden") / "shapes",
                        val_fraction=0.0, progress=False)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_dissect_then_export_carries_the_unit_labels_into_the_bundle(run_dir, broden, tmp_path, capsys):
    report = tmp_path / "report"
    code = main(["dissect", "--model", str(run_dir), "--data", str(broden), "--layers", "layer2,layer3",
                 "--out", str(report), "--adversarial", "--steps", "2", "--batch-size", "8", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 24 and set(summary["layers"]) == {"layer2", "layer3"}
    doc = json.loads((report / "dissection.json").read_text())
    for name in ("report.html", "detectors.png", "top_layer2.png", "top_layer3.png", "consistency.png",
                 "r_hist.png"):
        assert (report / name).is_file(), name
    layer3 = doc["layers"]["layer3"]
    assert len(layer3["units"]) == 128
    m = layer3["metrics"]
    assert 0 < m["consistency_real"] <= 1 and 0 < m["consistency_all"] <= 1
    assert 0 <= m["r_mean"] <= 1 and sum(m["r_hist"]) == 24 and m["mis"] >= 0
    assert "stable_fraction" in m["label_stability"]

    bundle_dir = tmp_path / "models" / "tiny" / "3"
    code = main(["export", "--run", str(run_dir), "--out", str(bundle_dir), "--dissection", str(report), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["name"], out["version"], out["layers"]) == ("tiny", 3, ["layer2", "layer3"])
    manifest = load_bundle(bundle_dir).manifest
    for unit, info in zip(layer3["units"], manifest.layer("layer3").units_info, strict=True):
        assert (info.label, info.category, info.detector) == (unit["label"], unit["category"], unit["detector"])
    assert manifest.layer("layer3").baselines == [u["baseline"] for u in layer3["units"]]
    assert manifest.cooccurrence == doc["cooccurrence"]
    assert manifest.provenance["regime"] == "standard" and "config" in manifest.provenance
    detector = manifest.adversarial_detector  # export calibrates the adversarial detector by default
    assert detector["kind"] == "mahalanobis*0.7+max_softmax*0.3" and detector["target_fpr"] == 0.05
    assert "detector.safetensors" in manifest.files


def test_bad_arguments_are_one_line_errors(run_dir, tmp_path, capsys):
    assert main(["dissect", "--model", str(tmp_path), "--data", "shapes:8", "--out", str(tmp_path / "r")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["dissect", "--model", str(run_dir), "--data", "shapes:8", "--out", str(tmp_path / "r"),
                 "--layers", "layer9"]) == 2
    assert "unknown layer 'layer9'" in capsys.readouterr().err
    assert main(["dissect", "--model", str(run_dir), "--data", "shapes:8", "--out", str(tmp_path / "r"),
                 "--chunk-mb", "0"]) == 2
    assert "--chunk-mb: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["dissect", "--model", str(run_dir), "--data", "shapes:8", "--out", str(tmp_path / "r"),
                 "--mask-size", "-1"]) == 2
    assert "--mask-size: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a training run" in capsys.readouterr().err
