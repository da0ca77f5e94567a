"""The one grammar of dataset specs, read by every command (`train`, `evaluate`, `dissect`, `experiment`).

    SCHEME:ARG[@SPLIT]
    shapes | shapes:N | shapes:N:SEED   ShapesWorld, N images (default DEFAULT_SHAPES_N), generated on the fly
    broden:PATH  (or a bare PATH)       a Broden-layout directory (ShapesWorld export or real Broden)
    imagefolder:PATH                    torchvision ImageFolder: PATH/<split>/<class>/* or PATH/<class>/*
    cifar10:PATH                        CIFAR-10 python batches (PATH or PATH/cifar-10-batches-py)

Which split a command reads is the command's choice (train: train and val; evaluate: --split, default val;
dissection: val for ShapesWorld, the whole directory for Broden); `@SPLIT` at the end pins it.

ShapesWorld seeds: split s of `shapes:N:SEED` is drawn with seed 3·SEED + index(s) (train 0, val 1, test 2),
so the splits never share images and the same spec and split give the same images in every command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput, UnknownName

SPLITS: tuple[str, ...] = ("train", "val", "test")
SCHEMES: tuple[str, ...] = ("shapes", "broden", "imagefolder", "cifar10")
DEFAULT_SHAPES_N = 2000


@dataclass(frozen=True)
class DataSpec:
    """A parsed spec. `path` is set for every scheme but shapes; `n` and `seed` only mean something for shapes."""

    scheme: str
    path: Path | None = None
    n: int = DEFAULT_SHAPES_N
    seed: int = 0
    split: str | None = None  # pinned by "@SPLIT"

    def shapes_seed(self, split: str) -> int:
        """The ShapesWorld seed of `split` (see the module docstring)."""
        return 3 * self.seed + SPLITS.index(split)


def parse(text: str) -> DataSpec:
    """Parse a spec; every malformed one raises InvalidInput (field "dataset") or UnknownName saying what is wrong."""
    body, at, split = text.rpartition("@") if "@" in text else (text, "", None)
    if at and split not in SPLITS:
        raise UnknownName("split", split or "", SPLITS)
    scheme, colon, arg = body.partition(":")
    if scheme not in SCHEMES:
        if colon or not body:
            raise UnknownName("dataset scheme", scheme, SCHEMES)
        scheme, arg = "broden", body  # a bare directory is a Broden directory
    if scheme == "shapes":
        return _shapes(arg, split)
    if not arg:
        raise InvalidInput("dataset", f"{scheme}:PATH needs a path")
    path = Path(arg).expanduser()
    if not path.exists():
        raise InvalidInput("dataset", f"{scheme} path does not exist: {path}")
    return DataSpec(scheme, path, split=split)


def _shapes(arg: str, split: str | None) -> DataSpec:
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
    return DataSpec("shapes", n=n, seed=seed, split=split)
