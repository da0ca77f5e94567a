"""Network Dissection: a planted colour detector is found, a noise unit is not, and streaming equals exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptlens.handlers import zoo
from conceptlens.training.data.shapes import CONCEPT_ID, ShapesWorld
from conceptlens.training.data.shapes_catalog import OBJECT_COLORS
from conceptlens.training.dissect.engine import DissectConfig, concepts_of, dissect, unpack
from conceptlens.training.dissect.labels import DETECTOR_IOU

SIZE = 32
PLANTED = "red"


class PlantedNet(nn.Module):
    """Layer "detect" has two units at half resolution. Unit 0 fires on one exact colour (times a mild fixed
    spatial gain, so that saturated responses do not tie at the threshold); unit 1 is pseudo-random noise of the
    pixels (a hash of a random projection), tied to no concept. The net sees raw [0,1] pixels (mean 0, std 1)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        colour = torch.tensor(OBJECT_COLORS[PLANTED], dtype=torch.float32) / 255
        self.register_buffer("colour", colour.view(1, 3, 1, 1))
        self.register_buffer("gain", 0.8 + 0.2 * torch.rand(1, 1, SIZE // 2, SIZE // 2, generator=gen))
        self.register_buffer("projection", torch.randn(1, 3, 3, 3, generator=gen))
        self.detect = _Detect()
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.detect(x, self.colour, self.gain, self.projection)
        return self.fc(a.mean((2, 3)))


class _Detect(nn.Module):
    def forward(self, x: torch.Tensor, colour: torch.Tensor, gain: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        near = F.avg_pool2d(torch.exp(-((x - colour) ** 2).sum(1, keepdim=True) / 0.01), 2) * gain
        noise = torch.frac(torch.sin(F.conv2d(x, proj, stride=2, padding=1) * 1000.0).abs() * 43758.5453)
        return torch.cat([near, noise], 1)


zoo.register_arch("test_planted", last_layer="detect", head="fc", default_layers=("detect",))(PlantedNet)


def test_planted_colour_unit_is_labelled_and_noise_unit_is_not_a_detector():
    data = ShapesWorld(96, size=SIZE, seed=1, with_masks=True)
    model = zoo.build_model("test_planted", data.classes, input_size=SIZE, mean=(0, 0, 0), std=(1, 1, 1))
    result = dissect(model, data, DissectConfig(layers=("detect",), batch_size=32))
    planted, noise = result.layers["detect"].units
    assert (planted.label, planted.category) == (PLANTED, "color")
    assert planted.detector and planted.iou > DETECTOR_IOU
    runner_up = sorted(result.layers["detect"].iou[0].tolist())[-2]
    assert planted.iou > 2 * runner_up  # the planted concept stands out, not a near tie
    assert not noise.detector and noise.iou < DETECTOR_IOU


def _exact(model, data, layer: str, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All in memory: exact quantile over every activation, then IoU per (unit, concept) with explicit loops."""
    images, masks = [], []
    for i in range(len(data)):
        image, _, m = data[i]
        images.append(image)
        masks.append(m)
    x = torch.stack(images)
    with torch.no_grad(), zoo_capture(model, layer) as acts:
        model(x)
    a = acts[layer]
    units = a.shape[1]
    thresholds = torch.quantile(a.transpose(0, 1).reshape(units, -1), 1 - q, dim=1, interpolation="lower")
    up = F.interpolate(a, size=(SIZE, SIZE), mode="bilinear", align_corners=False) > thresholds.view(1, -1, 1, 1)
    upf = up.flatten(2).double()  # (N, K, P)
    per_image = upf.sum(2)  # |M_k(x)|
    concepts = concepts_of(data)
    iou = torch.zeros(units, max(c.id for c in concepts) + 1, dtype=torch.float64)
    for c in concepts:
        lab = torch.stack([m[c.category] for m in masks]) == c.id  # (N,H,W)
        annotated = torch.stack([(m[c.category] != 0).any() for m in masks])  # (N,)
        inter = torch.einsum("nkp,np->k", upf, lab.flatten(1).double())
        union = (per_image * annotated.double().unsqueeze(1)).sum(0) + lab.sum().double() - inter
        iou[:, c.id] = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    return thresholds, iou


def zoo_capture(model, layer):
    from conceptlens.handlers.hooks import capture

    return capture(model, [layer], detach=True)


@pytest.mark.parametrize(("layer", "cache", "chunk_bytes"), [("layer1", False, 1), ("layer3", True, 1),
                                                             ("layer3", True, 32 << 20)])
@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_streaming_dissection_matches_exact_in_memory_computation(layer, cache, chunk_bytes, tmp_path):
    torch.manual_seed(0)
    data = ShapesWorld(40, size=SIZE, seed=2, with_masks=True)
    model = zoo.build_model("small_cnn", data.classes, input_size=SIZE).eval()
    q = 0.005
    # With `cache`, pass 2 reads pass 1's chunks back from disk instead of running the model again.
    # chunk_bytes=1: one chunk per batch of 7 (the last one short); 32 MB: the whole dataset in one chunk.
    result = dissect(model, data, DissectConfig(layers=(layer,), batch_size=7, sketch_k=4096, quantile=q,
                                                cache=cache, cache_dir=str(tmp_path), chunk_bytes=chunk_bytes))
    assert list(tmp_path.iterdir()) == []  # the cache cleans up after itself
    thresholds, iou = _exact(model, data, layer, q)
    got = result.layers[layer]
    torch.testing.assert_close(got.thresholds, thresholds, rtol=0, atol=1e-6)
    assert (got.iou - iou).abs().max().item() < 1e-3
    exact_best = iou[:, 1:].argmax(1) + 1
    assert [u.concept_id for u in got.units if u.iou > 0] == [int(exact_best[u.index]) for u in got.units
                                                                if u.iou > 0]


class _SolidColourFirst(torch.utils.data.Dataset):
    """ShapesWorld items whose first `solid` images are painted all in the planted colour (masks kept)."""

    def __init__(self, data: ShapesWorld, solid: int) -> None:
        self.data, self.solid, self.concepts, self.classes = data, solid, data.concepts, data.classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label, masks = self.data[i]
        if i < self.solid:
            colour = torch.tensor(OBJECT_COLORS[PLANTED], dtype=torch.float32) / 255
            image = colour.view(3, 1, 1).expand_as(image).clone()
        return image, label, masks


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_unrepresentative_first_chunk_falls_back_to_the_full_sketch_and_stays_exact(tmp_path, caplog):
    # The first chunk (one batch: chunk_bytes=1) is two all-red images: the colour unit's tail bound from it lies
    # above its final T_k.
    data = _SolidColourFirst(ShapesWorld(60, size=SIZE, seed=6, with_masks=True), solid=2)
    model = zoo.build_model("test_planted", data.classes, input_size=SIZE, mean=(0, 0, 0), std=(1, 1, 1))
    with caplog.at_level("WARNING"):
        result = dissect(model, data, DissectConfig(layers=("detect",), batch_size=2, cache_dir=str(tmp_path),
                                                    chunk_bytes=1))
    assert "rerunning the threshold sketch in full" in caplog.text
    thresholds, iou = _exact(model, data, "detect", 0.005)
    torch.testing.assert_close(result.layers["detect"].thresholds, thresholds, rtol=0, atol=1e-6)
    assert (result.layers["detect"].iou - iou).abs().max().item() < 1e-3


def test_unpack_accepts_both_item_orders():
    images, masks, labels = torch.rand(2, 3, 4, 4), {"color": torch.zeros(2, 4, 4, dtype=torch.long)}, torch.ones(2)
    for batch in ([images, labels.long(), masks], [images, masks, labels.long()]):
        got_images, got_labels, got_masks = unpack(batch)
        assert got_images is images and got_labels.tolist() == [1, 1] and set(got_masks) == {"color"}
    assert unpack([images, -torch.ones(2, dtype=torch.long), masks])[1] is None  # Broden without classes


def test_cooccurrence_and_baselines_are_measured():
    data = ShapesWorld(27, size=SIZE, seed=3, with_masks=True)
    model = zoo.build_model("small_cnn", data.classes, input_size=SIZE).eval()
    result = dissect(model, data, DissectConfig(layers=("layer3",), batch_size=9))
    # Each object concept occurs in every image of its own class and in no other class's images.
    for name in data.classes:
        row = result.cooccurrence[name]
        assert row[name] == 1.0 and sum(row.values()) == 1.0
    with torch.no_grad(), zoo_capture(model, "layer3") as acts:
        model(torch.stack([data[i][0] for i in range(len(data))]))
    torch.testing.assert_close(result.layers["layer3"].baselines, acts["layer3"].mean((0, 2, 3)), rtol=1e-5,
                               atol=1e-6)
    assert CONCEPT_ID["object", data.classes[0]] in {c.id for c in result.concepts}


@pytest.mark.parametrize(("src", "dst"), [((8, 8), (32, 32)), ((7, 7), (224, 224)), ((5, 9), (17, 40)),
                                          ((16, 16), (8, 8))])
def test_separable_upsample_equals_bilinear_interpolate(src, dst):
    from conceptlens.training.dissect.iou import upsample

    a = torch.randn(3, 4, *src, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(a, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample(a, dst), expected, rtol=0, atol=2e-6)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_cache_that_would_fill_the_disk_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    import shutil
    from collections import namedtuple

    data = ShapesWorld(20, size=SIZE, seed=8, with_masks=True)
    model = zoo.build_model("small_cnn", data.classes, input_size=SIZE).eval()
    plain = dissect(model, data, DissectConfig(layers=("layer2",), batch_size=8, cache=False))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1 << 30, 1 << 30, 1024))  # a full disk
    with caplog.at_level("WARNING"):
        cached = dissect(model, data, DissectConfig(layers=("layer2",), batch_size=8, cache_dir=str(tmp_path)))
    assert "running the model again in pass 2" in caplog.text
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(cached.layers["layer2"].iou, plain.layers["layer2"].iou, rtol=0, atol=0)


@pytest.mark.parametrize(("src", "dst"), [((4, 4), (32, 32)), ((7, 5), (112, 96)), ((3, 3), (10, 10)),
                                          ((1, 1), (8, 8)), ((6, 6), (4, 4))])
def test_block_sparse_counts_equal_dense_bilinear_counts(src, dst):
    """IoUAccumulator interpolates only the blocks whose corners exceed T_k; its counts must equal thresholding
    the dense F.interpolate maps, at integer and fractional scales and when shrinking."""
    from conceptlens.training.dissect.iou import IoUAccumulator

    gen = torch.Generator().manual_seed(sum(src) + sum(dst))
    acts = torch.relu(torch.randn(6, 5, *src, generator=gen))
    thresholds = torch.quantile(acts.transpose(0, 1).reshape(5, -1), 0.9, dim=1)
    ids = torch.randint(0, 4, (6, *dst), generator=gen)
    acc = IoUAccumulator(thresholds, [0, 0, 0, 0], ["object"])
    acc.update(acts, {"object": ids})
    on = F.interpolate(acts, size=dst, mode="bilinear", align_corners=False) > thresholds.view(1, -1, 1, 1)
    onehot = F.one_hot(ids, 4).double()  # (B,H,W,C)
    expected = torch.einsum("bkhw,bhwc->kc", on.double(), onehot)
    torch.testing.assert_close(acc.intersection, expected, rtol=0, atol=0)
    torch.testing.assert_close(acc.mask_pixels[:, 0], on.double().sum((0, 2, 3)), rtol=0, atol=0)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_cached_candidate_maps_give_the_same_dissection_as_rerunning_the_model(tmp_path):
    """Pass 1 caches only the maps whose maximum tops the tail sketch's (rising) bound; pass 2 from that cache must
    count exactly what rerunning the model counts, chunk by chunk (chunk_bytes=1: one chunk per batch)."""
    data = ShapesWorld(45, size=SIZE, seed=9, with_masks=True)
    model = zoo.build_model("small_cnn", data.classes, input_size=SIZE).eval()
    config = DissectConfig(layers=("layer2", "layer3"), batch_size=8, chunk_bytes=1, cache_dir=str(tmp_path))
    cached = dissect(model, data, config)
    rerun = dissect(model, data, DissectConfig(layers=("layer2", "layer3"), batch_size=8, chunk_bytes=1, cache=False))
    for name in ("layer2", "layer3"):
        assert torch.equal(cached.layers[name].iou, rerun.layers[name].iou)
        assert torch.equal(cached.layers[name].thresholds, rerun.layers[name].thresholds)
        assert cached.layers[name].metrics["mis"] == rerun.layers[name].metrics["mis"]
