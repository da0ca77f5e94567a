"""Broden layout (NetDissect's concept-dataset format): a writer for ShapesWorld and a reader for any Broden dir.

Layout (as in CSAILVision/NetDissect-Lite `loader/data_loader.py` and the broden1_224/227 downloads):

    index.csv       image,split,ih,iw,sh,sw,<category>,...   one row per image; a category cell holds
                    ';'-separated entries, each a mask PNG path relative to images/ or a whole-image label number
    category.csv    name,first,last,count,frequency
    label.csv       number,name,category,frequency,coverage,syns   (category like "color(120);object(3)")
    c_<cat>.csv     code,number,name,frequency,coverage     (dense per-category codes -> global numbers)
    images/...      the images and the mask PNGs; a mask pixel's label number is R + 256·G

Label numbers are global across categories; 0 means "no label". Our writer adds one sidecar file,
`classes.json` (class names and each image's class), which NetDissect tools ignore; it is what lets a
ShapesWorld export be used for classification too.

Reader conventions (`BrodenDataset`):
- masks come back at the image's resolution (ih, iw), or at `size` when given (nearest-neighbour), so the
  masks of one item always line up with its image;
- whole-image labels (e.g. scene) are broadcast to full masks, as NetDissect does;
- a cell with several entries is layered in order and, in `masks`, the first non-zero label wins per pixel;
  `layers(i)` returns every layer separately when multi-label pixels matter.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from conceptlens.handlers.errors import InvalidInput, UnknownName

log = logging.getLogger(__name__)

META_COLUMNS: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")
CLASSES_FILE = "classes.json"
_CATEGORY_COUNT = re.compile(r"^([^(]*)\(([^)]*)\)$")


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) label numbers -> (H, W, 3) uint8 RGB with R = n mod 256, G = n // 256 (Broden's mask encoding)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= 256 * 256:
        raise InvalidInput("labels", "Broden mask labels must lie in [0, 65535]")
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return rgb


def decode_labels(path: Path) -> np.ndarray:
    """A Broden mask PNG -> (H, W) int64 label numbers (R + 256·G)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


# ----------------------------------------------------------------------------------------------- writer


def write_broden(
    dataset: Any, out_dir: str | Path, *, val_fraction: float = 0.2, progress: bool = True, prefix: str = "shapes"
) -> Path:
    """Write a ShapesWorld-like dataset (`render(i)`, `.concepts`, `.classes`, `len`) in Broden layout.

    The last round(len · val_fraction) images get split "val", the others "train". Returns `out_dir`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput("val_fraction", f"must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInput("out", f"{out} exists and is not a directory")
    (out / "images" / prefix).mkdir(parents=True, exist_ok=True)
    concepts = list(dataset.concepts)
    categories = list(dict.fromkeys(cat for _, _, cat in concepts))
    n = len(dataset)
    n_val = round(n * val_fraction)
    freq: dict[int, int] = {}  # label -> images it appears in
    cover: dict[int, float] = {}  # label -> pixel coverage in whole-image units
    cat_freq = dict.fromkeys(categories, 0)
    rows: list[dict[str, Any]] = []
    image_classes: dict[str, int] = {}
    for i in tqdm(range(n), desc="writing Broden", unit="img", disable=not progress):
        sample = dataset.render(i)
        h, w = sample.image.shape[:2]
        stem = f"{prefix}/{i:08d}"
        Image.fromarray(sample.image).save(out / "images" / f"{stem}.png", compress_level=1)
        row: dict[str, Any] = {"image": f"{stem}.png", "split": "val" if i >= n - n_val else "train",
                               "ih": h, "iw": w, "sh": h, "sw": w}
        for cat in categories:
            mask = sample.masks[cat]
            ids, counts = np.unique(mask[mask > 0], return_counts=True)
            if len(ids) == 0:
                row[cat] = ""  # no concept of this category in this image: an empty cell, as in Broden
                continue
            rel = f"{stem}_{cat}.png"
            Image.fromarray(encode_labels(mask)).save(out / "images" / rel, compress_level=1)
            row[cat] = rel
            cat_freq[cat] += 1
            for cid, count in zip(ids.tolist(), counts.tolist(), strict=True):
                freq[cid] = freq.get(cid, 0) + 1
                cover[cid] = cover.get(cid, 0.0) + count / (h * w)
        rows.append(row)
        image_classes[row["image"]] = int(sample.label)

    with open(out / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*META_COLUMNS, *categories])
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "category.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "first", "last", "count", "frequency"])
        for cat in categories:
            ids = [cid for cid, _, c in concepts if c == cat]
            writer.writerow([cat, min(ids), max(ids), len(ids), cat_freq[cat]])
    with open(out / "label.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for cid, name, cat in concepts:
            writer.writerow([cid, name, f"{cat}({freq.get(cid, 0)})", freq.get(cid, 0), f"{cover.get(cid, 0):.2f}", ""])
    for cat in categories:
        with open(out / f"c_{cat}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["code", "number", "name", "frequency", "coverage"])
            members = [(cid, name) for cid, name, c in concepts if c == cat]
            for code, (cid, name) in enumerate(members, start=1):
                writer.writerow([code, cid, name, freq.get(cid, 0), f"{cover.get(cid, 0):.2f}"])
    with open(out / CLASSES_FILE, "w") as f:
        json.dump({"classes": list(dataset.classes), "images": image_classes, "source": repr(dataset)}, f)
    log.info("wrote %d images (%d val) in Broden layout to %s", n, n_val, out)
    return out


# ----------------------------------------------------------------------------------------------- reader


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise InvalidInput("broden", f"missing {path.name} in {path.parent}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _primary_category(cell: str) -> str:
    """'color(120);object(3)' -> the category with the most images ('color'); a bare name is itself."""
    best, best_count = "", -1
    for entry in filter(None, cell.split(";")):
        match = _CATEGORY_COUNT.match(entry)
        name, count = (match.group(1), int(match.group(2) or 0)) if match else (entry, 0)
        if count > best_count:
            best, best_count = name, count
    return best


class BrodenDataset(Dataset):
    """A Broden-layout directory as a torch Dataset (works with DataLoader workers: state is plain data).

    Items: (image float32 (3, H, W) in [0,1], label int, masks dict category -> int64 (H, W) global label
    numbers). `label` is the image's class when the directory has a `classes.json` (our ShapesWorld export),
    else -1. `split` keeps only rows of that split; `categories` keeps only those mask categories; `size`
    resizes image (bilinear) and masks (nearest) to size². `.labels`: number -> (name, category).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        categories: Sequence[str] | None = None,
        size: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidInput("broden", f"not a directory: {self.root}")
        index = _read_csv(self.root / "index.csv")
        known = [row["name"] for row in _read_csv(self.root / "category.csv")]
        columns = list(index[0]) if index else [*META_COLUMNS, *known]
        available = [c for c in columns if c not in META_COLUMNS]
        if categories is not None:
            for cat in categories:
                if cat not in available:
                    raise UnknownName("Broden category", cat, available)
            available = [c for c in available if c in categories]
        self.categories: list[str] = available
        if split is not None:
            index = [row for row in index if row["split"] == split]
            if not index:
                raise InvalidInput("split", f"no images with split {split!r} in {self.root}")
        self.size = int(size) if size else None
        # Plain tuples so worker processes get a cheap, picklable copy.
        self.rows: list[tuple[str, int, int, dict[str, list[str]]]] = [
            (row["image"], int(row["ih"]), int(row["iw"]),
             {cat: [e for e in (row.get(cat) or "").split(";") if e] for cat in self.categories})
            for row in index
        ]
        self.labels: dict[int, tuple[str, str]] = {
            int(row["number"]): (row["name"], _primary_category(row["category"]))
            for row in _read_csv(self.root / "label.csv")
        }
        self.classes: list[str] = []
        self._image_class: dict[str, int] = {}
        if (self.root / CLASSES_FILE).is_file():
            meta = json.loads((self.root / CLASSES_FILE).read_text())
            self.classes = list(meta["classes"])
            self._image_class = {k: int(v) for k, v in meta["images"].items()}

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.rows[index][0]

    def class_of(self, index: int) -> int:
        """The image's class index, -1 when the directory has no classes."""
        return self._image_class.get(self.rows[index][0], -1)

    def layers(self, index: int) -> dict[str, np.ndarray]:
        """category -> (D, ih, iw) int64: one layer per cell entry (D = 0 for an empty cell), unmerged."""
        _, ih, iw, cells = self.rows[index]
        out: dict[str, np.ndarray] = {}
        for cat, entries in cells.items():
            stack = []
            for entry in entries:
                if entry.isdigit():
                    stack.append(np.full((ih, iw), int(entry), dtype=np.int64))
                    continue
                labels = decode_labels(self.root / "images" / entry)
                if labels.shape != (ih, iw):  # broden1_224 stores masks at half resolution (sh, sw)
                    labels = _resize_labels(labels, ih, iw)
                stack.append(labels)
            out[cat] = np.stack(stack) if stack else np.zeros((0, ih, iw), dtype=np.int64)
        return out

    def masks(self, index: int) -> dict[str, np.ndarray]:
        """category -> (ih, iw) int64 labels; where a cell has several layers the first non-zero one wins."""
        merged = {}
        for cat, stack in self.layers(index).items():
            mask = np.zeros(stack.shape[1:], dtype=np.int64)
            for layer in stack[::-1]:  # later layers first, so earlier ones overwrite them
                mask = np.where(layer > 0, layer, mask)
            merged[cat] = mask
        return merged

    def load_image(self, index: int) -> torch.Tensor:
        with Image.open(self.image_path(index)) as img:
            rgb = img.convert("RGB")
            if self.size and rgb.size != (self.size, self.size):
                rgb = rgb.resize((self.size, self.size), Image.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        masks = self.masks(index)
        if self.size:
            masks = {cat: _resize_labels(m, self.size, self.size) for cat, m in masks.items()}
        return self.load_image(index), self.class_of(index), {c: torch.from_numpy(m) for c, m in masks.items()}


def _resize_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (never blends label numbers)."""
    rows = np.minimum((np.arange(h) + 0.5) * labels.shape[0] / h, labels.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * labels.shape[1] / w, labels.shape[1] - 1).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


class BrodenClassification(Dataset):
    """A Broden directory with classes (a ShapesWorld export) as (image, label) pairs, for training."""

    def __init__(self, root: str | Path, split: str | None = None, size: int | None = None) -> None:
        self.broden = BrodenDataset(root, split=split, categories=[], size=size)
        if not self.broden.classes:
            raise InvalidInput("dataset", f"{root} has no {CLASSES_FILE}: its images carry no class labels")
        self.classes = self.broden.classes

    def __len__(self) -> int:
        return len(self.broden)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.broden.load_image(index), self.broden.class_of(index)
