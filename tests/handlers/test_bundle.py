"""The bundle round trip: export a small_cnn, load it back, and refuse every kind of damaged bundle."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptlens.handlers import bundle as B
from conceptlens.handlers.errors import BundleError, InvalidInput
from conceptlens.handlers.zoo import build_model, save_weights
from conceptlens.training.export import export_bundle

CLASSES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("small_cnn", CLASSES, input_size=32)
    # Non-trivial BatchNorm statistics so eval-mode export is not an identity normalisation.
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m(torch.rand(8, 3, 32, 32))
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    dissection = {"layers": {"layer3": {"units": [
        {"label": "red" if k == 5 else "", "category": "color" if k == 5 else "", "iou": 0.2 if k == 5 else 0.01,
         "detector": k == 5, "baseline": 0.1 * k} for k in range(128)]}},
        "cooccurrence": {"red": {"circle": 0.5, "square": 0.0}}}
    out = tmp_path_factory.mktemp("repo") / "shapes" / "1"
    return export_bundle(model, out, name="shapes", version=1, layers=["layer2", "layer3"], dissection=dissection,
                         metrics={"clean_accuracy": 0.5}, provenance={"seed": 3, "lambda": 0.1})


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    dst = tmp_path / "shapes" / "1"
    shutil.copytree(exported, dst)
    return dst


def test_export_writes_a_bundle_that_loads(exported, model):
    bundle = B.load_bundle(exported)
    m = bundle.manifest
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "model.onnx", "weights.safetensors"]
    assert (m.name, m.version, m.architecture, m.classes) == ("shapes", 1, "small_cnn", CLASSES)
    assert (m.input.size, m.input.channels, m.input.value_range) == (32, 3, [0.0, 1.0])
    assert [(info.name, info.units) for info in m.layers] == [("layer2", 64), ("layer3", 128)]
    layer3 = m.layer("layer3")
    assert layer3.units_info[5] == B.UnitInfo(5, "red", "color", 0.2, True)
    assert layer3.baselines[7] == pytest.approx(0.7)
    assert m.layer("layer2").units_info[0] == B.UnitInfo(0)  # not dissected: unlabelled, baseline 0
    assert m.cooccurrence["red"]["circle"] == 0.5
    assert m.provenance["seed"] == 3 and m.provenance["git_commit"]
    assert set(m.files) == {"model.onnx", "weights.safetensors"}
    reloaded = bundle.torch_model()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_onnx_outputs_match_torch_at_another_batch_size(exported, model):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = B.run_onnx(exported / "model.onnx", images, providers=["CPUExecutionProvider"])
    assert list(got) == ["logits", "layer2", "layer3"]
    ref = B.torch_outputs(model, ["layer2", "layer3"], images)
    assert got["logits"].shape == (5, 4) and got["layer3"].shape == (5, 128, 4, 4)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, atol=B.ATOL, rtol=B.RTOL)


@pytest.mark.parametrize("victim", ["model.onnx", "weights.safetensors"])
def test_one_flipped_byte_is_refused_naming_the_file(copy, victim):
    path = copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"sha256 mismatch for {victim}"):
        B.load_bundle(copy)


@pytest.mark.parametrize("victim", ["model.onnx", "weights.safetensors", "manifest.json"])
def test_missing_file_is_refused_naming_it(copy, victim):
    (copy / victim).unlink()
    with pytest.raises(BundleError, match=f"missing file {victim}"):
        B.load_bundle(copy)


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(version="1"), "version"),
        (lambda d: d.pop("classes"), "classes"),
        (lambda d: d.update(architecture="resnet9000"), "architecture"),
        (lambda d: d["input"].update(mean=[0.5, 0.5]), "input.mean"),
        (lambda d: d["layers"][1]["baselines"].pop(), "layers[1].baselines"),
        (lambda d: d["layers"][0]["units_info"][3].update(detector="yes"), "layers[0].units_info[3].detector"),
        (lambda d: d["layers"][0]["units_info"][3].update(iou=1.5), "layers[0].units_info[3].iou"),
        (lambda d: d["files"].update({"../escape": "0" * 64}), "files.../escape"),
        (lambda d: d["files"].pop("weights.safetensors"), "files.weights.safetensors"),
    ],
)
def test_wrong_schema_is_refused_naming_the_field(copy, edit, field):
    _edit_manifest(copy, edit)
    with pytest.raises(BundleError, match=re.escape(f"manifest field '{field}'")):
        B.load_bundle(copy)


def test_renamed_layer_is_refused_as_an_onnx_mismatch(copy):
    _edit_manifest(copy, lambda d: d["layers"][0].update(name="layer1"))
    with pytest.raises(BundleError, match="outputs are"):
        B.load_bundle(copy)


def test_weights_that_disagree_with_the_onnx_graph_are_refused(copy, model):
    # Consistent hashes but different weights: only the ONNX-vs-torch output check can catch it.
    other = build_model("small_cnn", CLASSES, input_size=32).eval()
    save_weights(other, copy / "weights.safetensors")
    _edit_manifest(copy, lambda d: d["files"].update({"weights.safetensors": B.sha256_file(
        copy / "weights.safetensors")}))
    with pytest.raises(BundleError, match="differs from torch"):
        B.load_bundle(copy)
    assert B.load_bundle(copy, verify_onnx=False).manifest.name == "shapes"


def test_export_validates_its_arguments(model, tmp_path):
    with pytest.raises(InvalidInput, match="version"):
        export_bundle(model, tmp_path / "b", name="m", version=0)
    with pytest.raises(Exception, match="unknown layer 'nope'"):
        export_bundle(model, tmp_path / "b", name="m", version=1, layers=["nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        export_bundle(model, tmp_path / "full", name="m", version=1)
