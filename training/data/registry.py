"""`open_dataset(spec)`: one string names any dataset the trainer, evaluator or dissector can read.

Specs:
    shapes | shapes:N | shapes:N:SEED   ShapesWorld, N images per split (default 2000), generated on the fly.
                                        Splits draw from different seeds (train 3·SEED, val 3·SEED+1,
                                        test 3·SEED+2), so val images never repeat train images.
    broden:PATH                         a Broden-layout directory with class labels (a ShapesWorld export)
    imagefolder:PATH                    torchvision ImageFolder: PATH/<split>/<class>/*.png if PATH/<split>
                                        exists, else PATH/<class>/*.png
    cifar10:PATH                        CIFAR-10 python batches (PATH or PATH/cifar-10-batches-py)

Every dataset yields (image float32 (3, size, size) in [0,1], label int) and has `.classes`.
Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from conceptlens.handlers.errors import InvalidInput, UnknownName

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SHAPES_N = 2000


def _shapes(arg: str, split: str, size: int) -> Dataset:
    from .shapes import ShapesWorld

    fields = arg.split(":") if arg else []
    if len(fields) > 2:
        raise InvalidInput("dataset", f"shapes spec takes at most N and SEED (shapes:N:SEED), got 'shapes:{arg}'")
    try:
        n = int(fields[0]) if fields and fields[0] else DEFAULT_SHAPES_N
        seed = int(fields[1]) if len(fields) > 1 else 0
    except ValueError:
        raise InvalidInput("dataset", f"shapes:N:SEED needs integers, got 'shapes:{arg}'") from None
    if n <= 0:
        raise InvalidInput("dataset", f"shapes:N needs N > 0, got {n}")
    return ShapesWorld(n, size=size, seed=3 * seed + SPLITS.index(split))


def _existing(arg: str, scheme: str) -> Path:
    if not arg:
        raise InvalidInput("dataset", f"{scheme}:PATH needs a path")
    path = Path(arg).expanduser()
    if not path.exists():
        raise InvalidInput("dataset", f"{scheme} path does not exist: {path}")
    return path


def _broden(arg: str, split: str, size: int) -> Dataset:
    from .broden import BrodenClassification

    return BrodenClassification(_existing(arg, "broden"), split=split, size=size)


def _imagefolder(arg: str, split: str, size: int) -> Dataset:
    from .readers import open_imagefolder

    return open_imagefolder(_existing(arg, "imagefolder"), split=split, size=size)


def _cifar10(arg: str, split: str, size: int) -> Dataset:
    from .readers import open_cifar10

    return open_cifar10(_existing(arg, "cifar10"), split=split, size=size)


SCHEMES: dict[str, Callable[[str, str, int], Dataset]] = {
    "shapes": _shapes,
    "broden": _broden,
    "imagefolder": _imagefolder,
    "cifar10": _cifar10,
}


def open_dataset(spec: str, split: str = "train", size: int = 64) -> Dataset:
    """Open the dataset named by `spec` (see the module docstring) for `split`, images resized to `size`²."""
    scheme, _, arg = spec.partition(":")
    if scheme not in SCHEMES:
        raise UnknownName("dataset scheme", scheme, SCHEMES)
    if split not in SPLITS:
        raise UnknownName("split", split, SPLITS)
    if int(size) < 8:
        raise InvalidInput("size", f"must be at least 8 pixels, got {size}")
    return SCHEMES[scheme](arg, split, int(size))
