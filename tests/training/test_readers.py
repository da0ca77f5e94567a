"""ImageFolder and CIFAR-10 readers and the `open_dataset` specs, on tiny fixtures written by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.training.data.registry import open_dataset
from conceptlens.training.data.shapes import ShapesWorld

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def _folder(root: Path, per_class: int = 2, size: int = 20) -> None:
    for cls, rgb in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.full((size, size + k, 3), rgb, dtype=np.uint8)).save(root / cls / f"{k}.png")


def test_imagefolder_with_split_folders(tmp_path):
    _folder(tmp_path / "train")
    _folder(tmp_path / "val", per_class=1)
    train = open_dataset(f"imagefolder:{tmp_path}", "train", size=16)
    val = open_dataset(f"imagefolder:{tmp_path}", "val", size=16)
    assert train.classes == ["cat", "dog", "eel"] and len(train) == 6 and len(val) == 3
    for i in range(len(train)):
        image, label = train[i]
        assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
        expected = torch.tensor(COLOURS[train.classes[label]], dtype=torch.float32) / 255
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=1e-3)  # solid colours survive the resize
    with pytest.raises(InvalidInput, match="test"):
        open_dataset(f"imagefolder:{tmp_path}", "test")


def test_imagefolder_without_split_folders_and_workers(tmp_path):
    _folder(tmp_path)
    ds = open_dataset(f"imagefolder:{tmp_path}", "val", size=8)
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=2, num_workers=2)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def _cifar(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    """A CIFAR-10 python directory in the real format: pickled dicts, rows of 3072 bytes (R plane, G, B)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return written


def test_cifar10_python_batches(tmp_path):
    written = _cifar(tmp_path)
    train = open_dataset(f"cifar10:{tmp_path}", "train", size=32)
    test = open_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "test", size=64)
    assert len(train) == 15 and len(test) == 3 and train.classes[9] == "truck"
    data, labels = written["data_batch_2"]
    image, label = train[3]  # first image of the second batch
    assert label == labels[0]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(image, expected, atol=1e-6)  # channel planes decoded in the right order
    big, label_t = test[1]
    assert big.shape == (3, 64, 64) and label_t == written["test_batch"][1][1]
    assert big.min() >= 0.0 and big.max() <= 1.0


def test_cifar10_missing_batch_is_invalid_input(tmp_path):
    _cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(InvalidInput, match="cifar"):
        open_dataset(f"cifar10:{tmp_path}")


def test_shapes_specs_use_different_seeds_per_split():
    train, val = open_dataset("shapes:12", "train", size=32), open_dataset("shapes:12", "val", size=32)
    assert isinstance(train, ShapesWorld) and len(train) == 12 and train.size == 32
    assert not torch.equal(train[0][0], val[0][0])
    assert torch.equal(open_dataset("shapes:12:0", size=32)[5][0], train[5][0])
    assert not torch.equal(open_dataset("shapes:12:1", size=32)[5][0], train[5][0])
    assert len(open_dataset("shapes")) > 0


@pytest.mark.parametrize(
    ("spec", "split", "error", "mentions"),
    [
        ("mnist:/tmp", "train", UnknownName, "imagefolder"),
        ("shapes:0", "train", InvalidInput, "N > 0"),
        ("shapes:abc", "train", InvalidInput, "integers"),
        ("shapes:10", "holdout", UnknownName, "val"),
        ("imagefolder:/no/such/dir", "train", InvalidInput, "/no/such/dir"),
        ("cifar10:/no/such/dir", "train", InvalidInput, "/no/such/dir"),
        ("broden:", "train", InvalidInput, "path"),
    ],
)
def test_bad_specs_name_the_problem(spec, split, error, mentions):
    with pytest.raises(error, match=mentions):
        open_dataset(spec, split)
