"""The two dataset openers every command uses, both over the one spec grammar of `spec.py`:

- `open_dataset(spec, split, size)`: (image, label) pairs for training and evaluation;
- `open_concepts(spec, size)`: (image, label, masks) for Network Dissection (ShapesWorld or Broden).

The same ShapesWorld spec and split give the same images through both (tests/training/test_data_spec.py).
Every dataset yields images float32 (3, size, size) in [0,1] and has `.classes`. Nothing is ever downloaded.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from conceptlens.handlers.errors import InvalidInput, UnknownName

from .spec import DEFAULT_SHAPES_N, SCHEMES, SPLITS, DataSpec, parse

__all__ = ["DEFAULT_SHAPES_N", "SCHEMES", "SPLITS", "open_concepts", "open_dataset"]

CONCEPT_SPLIT = "val"  # the ShapesWorld split dissection reads: held out from training on the same spec


def open_dataset(spec: str, split: str = "train", size: int = 64) -> Dataset:
    """Open the dataset named by `spec` for `split` (unless the spec pins one), images resized to `size`²."""
    if split not in SPLITS:
        raise UnknownName("split", split, SPLITS)
    size = _size(size)
    data = parse(spec)
    split = data.split or split
    if data.scheme == "shapes":
        return _shapes(data, split, size, masks=False)
    if data.scheme == "broden":
        from .broden import BrodenClassification

        return BrodenClassification(data.path, split=split, size=size)
    from .readers import open_cifar10, open_imagefolder

    reader = open_imagefolder if data.scheme == "imagefolder" else open_cifar10
    return reader(data.path, split=split, size=size)


def open_concepts(spec: str, size: int) -> tuple[Dataset, dict[str, Any]]:
    """A concept dataset (images with per-pixel concept masks) and a description of it for reports: ShapesWorld
    (its `CONCEPT_SPLIT` unless pinned) or a Broden directory (all of it unless pinned)."""
    size = _size(size)
    data = parse(spec)
    if data.scheme == "shapes":
        split = data.split or CONCEPT_SPLIT
        return _shapes(data, split, size, masks=True), {"source": spec, "kind": "shapes", "n": data.n,
                                                       "seed": data.seed, "split": split}
    if data.scheme != "broden":
        raise InvalidInput("--data", f"{data.scheme} data has no concept masks; use shapes:N[:SEED] or a Broden "
                           "directory")
    from .broden import BrodenDataset

    return BrodenDataset(data.path, split=data.split, size=size), {"source": str(data.path), "kind": "broden",
                                                                    "split": data.split}


def _shapes(data: DataSpec, split: str, size: int, *, masks: bool) -> Dataset:
    from .shapes import ShapesWorld

    return ShapesWorld(data.n, size=size, seed=data.shapes_seed(split), with_masks=masks)


def _size(size: int) -> int:
    if int(size) < 8:
        raise InvalidInput("size", f"must be at least 8 pixels, got {size}")
    return int(size)
