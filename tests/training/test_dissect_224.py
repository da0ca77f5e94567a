"""224-px models: dissection on a Broden-layout concept set written at 224 px, with the batch size chosen for
the input size, and unit maps of any stride (14x14, 7x7) upsampled to the masks as F.interpolate does."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from conceptlens.cli import main
from conceptlens.training.cli_dissect import default_batch_size
from conceptlens.training.data.broden import write_broden
from conceptlens.training.data.shapes import ShapesWorld
from conceptlens.training.dissect.iou import upsample


@pytest.mark.parametrize("side", [7, 14, 28])
def test_maps_of_any_stride_upsample_like_f_interpolate(side):
    maps = torch.rand(2, 5, side, side, generator=torch.Generator().manual_seed(side))
    expected = F.interpolate(maps, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample(maps, (224, 224)), expected, rtol=1e-5, atol=1e-5)


def test_default_batch_size_shrinks_with_the_input():
    assert [default_batch_size(s) for s in (32, 64, 128, 224, 299)] == [64, 64, 32, 16, 8]


@pytest.mark.slow  # ShapesWorld rendered at 224 px and a resnet18 report: ~40 s of CPU
def test_imported_timm_model_dissects_broden_at_224(tmp_path, capsys):
    broden = write_broden(ShapesWorld(6, size=224, seed=2), tmp_path / "broden", val_fraction=0.0, progress=False)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=2).state_dict(), tmp_path / "w.pth")
    assert main(["import", "--arch", "timm:resnet18", "--weights", str(tmp_path / "w.pth"), "--classes",
                 str(tmp_path / "classes.txt"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input"]["size"] == 224  # timm's config
    assert main(["dissect", "--model", str(tmp_path / "run"), "--data", str(broden), "--out",
                 str(tmp_path / "report"), "--json"]) == 0
    doc = json.loads((tmp_path / "report" / "dissection.json").read_text())
    assert set(doc["layers"]) == {"layer3", "layer4"}  # strides 16 and 32: 14x14 and 7x7 maps at 224 px
    assert len(doc["layers"]["layer3"]["units"]) == 256 and len(doc["layers"]["layer4"]["units"]) == 512
    assert any(u["label"] for u in doc["layers"]["layer4"]["units"])
