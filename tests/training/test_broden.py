"""Broden layout: ShapesWorld round trip, DataLoader workers, and a hand-written fixture in real-Broden conventions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.training.data.broden import BrodenDataset, write_broden
from conceptlens.training.data.registry import open_dataset
from conceptlens.training.data.shapes import ShapesWorld


@pytest.fixture(scope="module")
def shapes_export(tmp_path_factory) -> tuple[ShapesWorld, Path]:
    world = ShapesWorld(20, size=32, seed=4, with_masks=True)
    return world, write_broden(world, tmp_path_factory.mktemp("shapes_broden"), val_fraction=0.25, progress=False)


def test_round_trip_gives_the_same_images_labels_and_masks(shapes_export):
    world, root = shapes_export
    ds = BrodenDataset(root)
    assert len(ds) == 20 and ds.categories == ["object", "part", "color", "texture"]
    assert ds.labels == {cid: (name, cat) for cid, name, cat in world.concepts}
    assert ds.classes == world.classes
    for i in range(len(world)):
        image, label, masks = ds[i]
        ref_image, ref_label, ref_masks = world[i]
        assert torch.equal(image, ref_image) and label == ref_label
        assert set(masks) == set(ref_masks)
        assert all(torch.equal(masks[c], ref_masks[c]) for c in masks)
    val = BrodenDataset(root, split="val")
    assert len(val) == 5 and torch.equal(val[0][0], world[15][0])


def test_export_files_follow_netdissect(shapes_export):
    world, root = shapes_export
    with open(root / "index.csv") as f:
        header = next(csv.reader(f))
    assert header == ["image", "split", "ih", "iw", "sh", "sw", "object", "part", "color", "texture"]
    with open(root / "category.csv") as f:
        cats = {row["name"]: row for row in csv.DictReader(f)}
    with open(root / "c_part.csv") as f:
        codes = list(csv.DictReader(f))
    parts = [(cid, name) for cid, name, cat in world.concepts if cat == "part"]
    assert [(int(r["number"]), r["name"]) for r in codes] == parts
    assert [int(r["code"]) for r in codes] == list(range(1, len(parts) + 1))
    assert int(cats["part"]["first"]) == parts[0][0] and int(cats["part"]["count"]) == len(parts)
    assert int(cats["object"]["frequency"]) == 20  # every image has an object


def test_reader_works_with_dataloader_workers(shapes_export):
    _, root = shapes_export
    ds = BrodenDataset(root, categories=["part", "texture"])
    batches = list(DataLoader(ds, batch_size=6, num_workers=2))
    assert sum(len(b[1]) for b in batches) == 20
    parts = torch.cat([b[2]["part"] for b in batches])
    assert set(batches[0][2]) == {"part", "texture"}
    assert torch.equal(parts, torch.stack([ds[i][2]["part"] for i in range(20)]))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor([ds.class_of(i) for i in range(20)]))


def test_open_dataset_reads_an_export_for_classification(shapes_export):
    world, root = shapes_export
    train = open_dataset(f"broden:{root}", "train", size=24)
    assert len(train) == 15 and train.classes == world.classes
    image, label = train[3]
    assert image.shape == (3, 24, 24) and label == world[3][1]


# ---------------------------------------------------------------- a fixture written by hand, the way Broden does it


def _png(path: Path, labels: np.ndarray) -> str:
    """Write labels as a Broden mask PNG (R = n mod 256, G = n // 256), encoded here independently of the reader."""
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path.name if path.parent.name == "images" else f"{path.parent.name}/{path.name}"


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def real_style(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broden_like")
    img = root / "images" / "ade20k"
    img.mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(img / "a.jpg", quality=95)
    Image.fromarray(np.full((8, 8, 3), 50, dtype=np.uint8)).save(img / "b.png")
    # a: masks at half resolution (4x4 for an 8x8 image), like broden1_224's 112x112 masks
    color = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]])
    obj_1 = np.array([[12, 12, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    obj_2 = np.array([[300, 300, 300, 300], [300, 300, 300, 300], [0, 0, 0, 0], [0, 0, 0, 0]])
    part_b = np.zeros((8, 8), dtype=np.int64)
    part_b[2:5, 3:7] = 300  # 300 = 44 + 256·1: needs the G channel
    _write_csv(root / "index.csv", [
        ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "scene"],
        ["ade20k/a.jpg", "train", 8, 8, 4, 4, _png(img / "a_color.png", color),
         f"{_png(img / 'a_object.png', obj_1)};{_png(img / 'a_object2.png', obj_2)}", "", "400"],
        ["ade20k/b.png", "val", 8, 8, 8, 8, "", "", _png(img / "b_part.png", part_b), "401;400"],
    ])
    _write_csv(root / "category.csv", [
        ["name", "first", "last", "count", "frequency"],
        ["color", 1, 2, 2, 1], ["object", 12, 300, 2, 1], ["part", 300, 300, 1, 1], ["scene", 400, 401, 2, 2],
    ])
    _write_csv(root / "label.csv", [
        ["number", "name", "category", "frequency", "coverage", "syns"],
        [1, "black", "color(1)", 1, 0.4, ""], [2, "white", "color(1)", 1, 0.4, "snow"],
        [12, "sky", "object(1)", 1, 0.1, ""], [300, "door", "object(1);part(3)", 2, 0.3, "doorway;portal"],
        [400, "kitchen", "scene(2)", 2, 2.0, ""], [401, "office", "scene(1)", 1, 1.0, ""],
    ])
    _write_csv(root / "c_color.csv", [["code", "number", "name", "frequency", "coverage"], [1, 1, "black", 1, 0.4],
                                      [2, 2, "white", 1, 0.4]])
    _write_csv(root / "c_object.csv", [["code", "number", "name", "frequency", "coverage"], [1, 12, "sky", 1, 0.1],
                                       [2, 300, "door", 1, 0.2]])
    _write_csv(root / "c_part.csv", [["code", "number", "name", "frequency", "coverage"], [1, 300, "door", 1, 0.1]])
    _write_csv(root / "c_scene.csv", [["code", "number", "name", "frequency", "coverage"], [1, 400, "kitchen", 2, 2],
                                      [2, 401, "office", 1, 1]])
    return root


def test_hand_written_broden_is_read_correctly(real_style):
    ds = BrodenDataset(real_style)
    assert len(ds) == 2 and ds.categories == ["color", "object", "part", "scene"]
    assert ds.labels[300] == ("door", "part")  # listed in two categories: the one with more images is primary
    assert ds.labels[2] == ("white", "color") and ds.labels[401] == ("office", "scene")
    image, label, masks = ds[0]
    assert image.shape == (3, 8, 8) and label == -1  # no classes.json: not a classification set
    assert abs(image.mean().item() - 200 / 255) < 0.02  # a JPEG, decoded to [0,1]
    # half-resolution masks are upsampled by nearest neighbour: each label becomes a 2x2 block
    half = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]])
    assert np.array_equal(masks["color"].numpy(), np.kron(half, np.ones((2, 2), dtype=np.int64)))
    # two object layers: the first non-zero wins (sky over door), the door shows where the sky is absent
    expected_obj = np.zeros((8, 8), dtype=np.int64)
    expected_obj[0:4, :] = 300
    expected_obj[0:2, 0:4] = 12
    assert np.array_equal(masks["object"].numpy(), expected_obj)
    layers = ds.layers(0)
    assert layers["object"].shape == (2, 8, 8) and layers["part"].shape == (0, 8, 8)
    assert (masks["part"] == 0).all()  # empty cell
    assert (masks["scene"] == 400).all()  # whole-image label broadcast
    _, _, masks_b = ds[1]
    assert masks_b["part"][2:5, 3:7].eq(300).all() and masks_b["part"].eq(300).sum() == 12
    assert (masks_b["scene"] == 401).all() and (ds.layers(1)["scene"][1] == 400).all()
    assert (masks_b["color"] == 0).all() and (masks_b["object"] == 0).all()


def test_hand_written_broden_filters(real_style):
    val = BrodenDataset(real_style, split="val", categories=["part"], size=16)
    assert len(val) == 1
    image, _, masks = val[0]
    assert image.shape == (3, 16, 16) and set(masks) == {"part"}
    assert masks["part"].shape == (16, 16) and masks["part"].eq(300).sum() == 12 * 4
    with pytest.raises(UnknownName, match="scene"):
        BrodenDataset(real_style, categories=["material"])
    with pytest.raises(InvalidInput, match="split"):
        BrodenDataset(real_style, split="test")
    with pytest.raises(InvalidInput, match="class"):
        open_dataset(f"broden:{real_style}")  # no class labels: cannot be used for classification
