"""224-px models: dissection on a Broden-layout concept set written at 224 px, with the batch size chosen for
the input size, unit maps of any stride (14x14, 7x7) upsampled to the masks as F.interpolate does, and the IoU
counted at the mask size (112 px by default, NetDissect's resolution for 224-px Broden)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from conceptlens.cli import main
from conceptlens.handlers import zoo
from conceptlens.handlers.hooks import capture
from conceptlens.training.cli_dissect import default_batch_size
from conceptlens.training.data.broden import write_broden
from conceptlens.training.data.shapes import ShapesWorld
from conceptlens.training.dissect.chunks import mask_resolution, unpack
from conceptlens.training.dissect.engine import DissectConfig, concepts_of, dissect
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


def test_mask_resolution_subsamples_like_nearest_and_restores_broden_half_resolution_masks():
    half = torch.randint(0, 50, (2, 112, 112))
    read_at_224 = half.repeat_interleave(2, 1).repeat_interleave(2, 2)  # how a 112-px Broden mask is read at 224
    assert torch.equal(mask_resolution({"object": read_at_224}, 112)["object"], half)
    odd = torch.randint(0, 50, (1, 150, 100))
    expected = F.interpolate(odd[:, None].float(), size=(112, 75), mode="nearest")[:, 0].long()
    assert torch.equal(mask_resolution({"part": odd}, 112)["part"], expected)
    assert mask_resolution({"part": odd}, None)["part"] is odd and mask_resolution({"part": odd}, 150)["part"] is odd


@pytest.mark.slow  # dissections at 224 px and a dense reference: 20-50 s on 2 busy cores
@pytest.mark.parametrize("mask_size", [112, None])
def test_iou_at_the_mask_size_equals_a_dense_computation_there(mask_size):
    """At 224 px the IoU is counted on masks subsampled to 112 (the default) or at full size: either way it is
    the dense F.interpolate-and-compare IoU at that resolution, with the dissection's own thresholds."""
    data = ShapesWorld(6, size=224, seed=5, with_masks=True)
    torch.manual_seed(0)
    model = zoo.build_model("small_cnn", data.classes, input_size=224).eval()
    result = dissect(model, data, DissectConfig(layers=("layer2",), batch_size=3, mask_size=mask_size))
    side = mask_size or 224
    images, _, masks = unpack(torch.utils.data.default_collate([data[i] for i in range(len(data))]))
    masks = mask_resolution(masks, mask_size)
    with torch.no_grad(), capture(model, ["layer2"], detach=True) as acts:
        model(images)
    thresholds = result.layers["layer2"].thresholds
    on = (F.interpolate(acts["layer2"], size=(side, side), mode="bilinear", align_corners=False)
          > thresholds.view(1, -1, 1, 1)).flatten(2).double()  # (N, K, P)
    expected = torch.zeros_like(result.layers["layer2"].iou)
    for concept in concepts_of(data):
        label = (masks[concept.category] == concept.id).flatten(1).double()  # (N, P)
        annotated = (masks[concept.category] != 0).flatten(1).any(1).double()  # (N,)
        inter = torch.einsum("nkp,np->k", on, label)
        union = (on.sum(2) * annotated.unsqueeze(1)).sum(0) + label.sum() - inter
        expected[:, concept.id] = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    torch.testing.assert_close(result.layers["layer2"].iou, expected, rtol=0, atol=1e-12)
