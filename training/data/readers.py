"""ImageFolder and CIFAR-10 from local paths, through torchvision's own dataset classes (never downloading).

Both yield (image float32 (3, size, size) in [0,1], label int) and keep torchvision's `.classes`.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from conceptlens.handlers.errors import InvalidInput

log = logging.getLogger(__name__)


def to_tensor(size: int) -> transforms.Compose:
    """PIL image -> float (3, size, size) in [0,1] (antialiased resize; ToTensor scales uint8 by 1/255)."""
    return transforms.Compose([transforms.Resize((size, size), antialias=True), transforms.ToTensor()])


def open_imagefolder(path: str | Path, split: str = "train", size: int = 64) -> Dataset:
    """torchvision ImageFolder over `path/<split>` when it exists, else over `path` itself (one pool, any split).

    A root that has some split folders but not the one asked for is an error, so a missing `val/` is never
    silently replaced by the training images.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidInput("imagefolder", f"not a directory: {root}")
    split_dirs = [d for d in ("train", "val", "test") if (root / d).is_dir()]
    if split_dirs:
        if split not in split_dirs:
            raise InvalidInput("split", f"{root} has split folders {split_dirs} but no {split!r}")
        root = root / split
    else:
        log.debug("%s has no split folders: using it whole for split %r", root, split)
    try:
        return datasets.ImageFolder(str(root), transform=to_tensor(size))
    except FileNotFoundError as err:  # torchvision's message for empty or class-less folders
        raise InvalidInput("imagefolder", str(err).splitlines()[0]) from None


class LocalCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 with the download path removed and the md5 check optional.

    The official files pass the md5 check; `verify_md5=False` accepts any batches in the same pickle format
    (a subset, a re-packed copy, a test fixture) and still fails clearly when a file is missing.
    """

    def __init__(
        self, root: str | Path, train: bool = True, transform: Callable | None = None, verify_md5: bool = False
    ) -> None:
        self.verify_md5 = verify_md5
        super().__init__(str(root), train=train, transform=transform, download=False)

    def _check_integrity(self) -> bool:
        return all(
            check_integrity(os.path.join(self.root, self.base_folder, name), md5 if self.verify_md5 else None)
            for name, md5 in self.train_list + self.test_list
        )

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not check_integrity(path, self.meta["md5"] if self.verify_md5 else None):
            raise InvalidInput("cifar10", f"missing or corrupted {path}")
        with open(path, "rb") as f:  # torchvision's own format: a latin1 pickle with the label names
            self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

def open_cifar10(path: str | Path, split: str = "train", size: int = 64, verify_md5: bool = False) -> Dataset:
    """CIFAR-10 python batches under `path` (or `path/cifar-10-batches-py`). train = data_batch_1..5;
    val and test both read test_batch (CIFAR-10 has no separate validation set)."""
    root = Path(path)
    if root.name == LocalCIFAR10.base_folder:
        root = root.parent
    if not (root / LocalCIFAR10.base_folder).is_dir():
        raise InvalidInput("cifar10", f"no {LocalCIFAR10.base_folder}/ directory under {root}")
    try:
        return LocalCIFAR10(root, train=split == "train", transform=to_tensor(size), verify_md5=verify_md5)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise InvalidInput("cifar10", f"{root / LocalCIFAR10.base_folder}: {err}") from None
