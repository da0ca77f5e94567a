"""`conceptlens data shapes`: write a ShapesWorld concept dataset in Broden layout."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

from .shapes import MIN_SIZE, SHAPES_CLASSES, ShapesWorld


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate ShapesWorld (objects built from named parts over textured backgrounds, with pixel masks for "
        "object, part, color and texture concepts) and write it in Broden layout (NetDissect's format: "
        "index.csv, category.csv, label.csv, c_<category>.csv, images/). The same --seed always gives the "
        "same images. The last --val-fraction of the images get split 'val'."
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; may exist, empty)")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", type=int, default=64, help=f"image side in pixels, >= {MIN_SIZE} (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of images in split 'val' (0.2)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _validate(args: argparse.Namespace) -> None:
    if args.n <= 0:
        raise InvalidInput("--n", f"must be a positive number of images, got {args.n}")
    if args.size < MIN_SIZE:
        raise InvalidInput("--size", f"must be at least {MIN_SIZE} pixels, got {args.size}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise InvalidInput("--val-fraction", f"must be in [0, 1), got {args.val_fraction}")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidInput("--out", f"{out} exists and is not a directory")
    if out.is_dir() and (out / "index.csv").exists():
        raise InvalidInput("--out", f"{out} already holds a dataset (index.csv); choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise InvalidInput("--out", f"{out} is not empty")


def run(args: argparse.Namespace) -> int:
    from .broden import write_broden  # after validation: bad input fails fast

    _validate(args)
    dataset = ShapesWorld(args.n, size=args.size, seed=args.seed, with_masks=True)
    start = time.perf_counter()
    out = write_broden(dataset, args.out, val_fraction=args.val_fraction, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    summary = {
        "out": str(out),
        "images": args.n,
        "val": round(args.n * args.val_fraction),
        "size": args.size,
        "seed": args.seed,
        "classes": SHAPES_CLASSES,
        "concepts": len(dataset.concepts),
        "seconds": round(seconds, 3),
        "images_per_second": round(args.n / max(seconds, 1e-9), 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.n} images ({summary['val']} val), {len(dataset.concepts)} concepts to {out} "
              f"in {seconds:.1f} s")
    return 0
