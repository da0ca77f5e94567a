"""`conceptlens import` refuses bad inputs with one line naming the problem, no traceback, and writes nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision

from conceptlens.cli import main

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), root / "r18.pth")
    with open(root / "notsd.pkl", "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "two.txt").write_text("cat\ndog\n")
    folder = root / "folder" / "train"
    for name in ("zebra", "ant", "moth", "bee"):
        (folder / name).mkdir(parents=True)
    return root


def _run(files, capsys, arch, weights, classes="classes.txt", *extra):
    out = files / "out"
    code = main(["import", "--arch", arch, "--weights", str(files / weights), "--classes", str(files / classes),
                 "--out", str(out), "--input-size", "32", *extra])
    captured = capsys.readouterr()
    return code, captured.err.strip(), out


@pytest.mark.parametrize(("arch", "weights", "classes", "words"), [
    ("resnet18", "notsd.pkl", "classes.txt", "notsd.pkl is not a plain state dict"),
    ("resnet34", "r18.pth", "classes.txt", "do not fit resnet34: 96 missing (layer1.2.bn1.bias"),
    ("resnet18", "r18.pth", "two.txt", "has 3 outputs but 2 classes were given (pass --replace-head"),
    ("timm:resnet5", "r18.pth", "classes.txt", "unknown timm model 'resnet5'"),
    ("resnet18", "missing.pth", "classes.txt", "no such file"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, arch, weights, classes, words):
    code, err, out = _run(files, capsys, arch, weights, classes)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("conceptlens import: error: ") and words in err
    assert not out.exists() and not list(files.glob(".out.*"))


def test_classes_from_an_imagefolder_and_a_replaced_head(files, capsys):
    code, err, out = _run(files, capsys, "resnet18", "r18.pth", "folder", "--replace-head", "--json")
    assert code == 0, err
    meta = json.loads((out / "run.json").read_text())
    assert meta["classes"] == ["ant", "bee", "moth", "zebra"]  # torchvision's sorted order; 4 classes, 3 in weights
    assert meta["imported"]["replaced_head"] == ["fc.bias", "fc.weight"]
    assert meta["input"]["size"] == 32 and meta["layers"] == ["layer3", "layer4"]
