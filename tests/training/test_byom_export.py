"""`conceptlens export` of an imported run: the run names no training data, so the default adversarial detector
is left out with one note saying how to add it later (and that advice works); asking for a detector without
the data to fit it on is one line naming --fit, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from conceptlens.cli import main
from conceptlens.training.data.shapes import SHAPES_CLASSES

FIT, CALIBRATION = "shapes:40", "shapes:40:1000"  # the calibrator needs >= 20 held-out images


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byom_export")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(SHAPES_CLASSES))
    torch.save(net.state_dict(), root / "r18.pth")
    (root / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")  # the fit data's classes are the model's
    assert main(["import", "--arch", "resnet18", "--weights", str(root / "r18.pth"), "--classes",
                 str(root / "classes.txt"), "--input-size", "32", "--out", str(root / "run")]) == 0
    return root


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_default_export_leaves_the_detector_out_with_one_note_whose_advice_works(imported, capsys):
    bundle = imported / "models" / "r18" / "1"
    capsys.readouterr()
    assert main(["export", "--run", str(imported / "run"), "--out", str(bundle)]) == 0
    captured = capsys.readouterr()
    (note,) = captured.err.strip().splitlines()
    assert note.startswith("note: no adversarial detector") and "names no training data" in note
    assert f"conceptlens calibrate --bundle {bundle} --fit DATA --calibration DATA" in note
    assert captured.out.startswith("wrote r18 v1")
    manifest = _manifest(bundle)
    assert "adversarial_detector" not in manifest and "detector.safetensors" not in manifest["files"]

    assert main(["calibrate", "--bundle", str(bundle), "--fit", FIT, "--calibration", CALIBRATION]) == 0
    assert _manifest(bundle)["adversarial_detector"]["kind"] == "mahalanobis*0.7+max_softmax*0.3"


def test_export_with_fit_data_calibrates_the_default_detector(imported, capsys):
    bundle = imported / "models" / "r18" / "2"
    capsys.readouterr()
    assert main(["export", "--run", str(imported / "run"), "--out", str(bundle), "--fit", FIT,
                 "--calibration", CALIBRATION, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["version"] == 2 and "note:" not in captured.err
    detector = _manifest(bundle)["adversarial_detector"]
    assert detector["kind"] == "mahalanobis*0.7+max_softmax*0.3"
    assert detector["calibration"]["fit"] == f"{FIT} (train split)"


@pytest.mark.parametrize("extra", [
    ["--detector", "max_softmax"],  # asked for explicitly
    ["--calibration", CALIBRATION],  # calibration data alone: the class means still need fit data
])
def test_asking_for_a_detector_without_fit_data_is_one_line_and_writes_nothing(imported, capsys, extra):
    out = imported / "models" / "r18" / "9"
    capsys.readouterr()
    assert main(["export", "--run", str(imported / "run"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("conceptlens export: error: --fit") and "names no training data" in err
    assert not out.exists() and not list(out.parent.glob(".9*"))
