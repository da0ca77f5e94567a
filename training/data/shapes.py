"""ShapesWorld: a generated, concept-annotated image dataset (docs/design.md §4).

Each image shows one object of a class in `SHAPES_CLASSES`, built from named parts (see `shapes_catalog`), at a
random position, scale, stretch, mirror and part colours, over a textured background, with 0-2 distractors
(stray parts or blobs) drawn underneath. Every pixel is annotated in four concept categories:

- object:  the class of the object covering the pixel (distractors are not objects),
- part:    the part covering the pixel (a stray wheel is still a wheel),
- color:   the named colour drawn at the pixel (every pixel has one: the palette is exact, no noise),
- texture: the background texture, on the pixels where the background is visible.

Concept ids are global across categories (0 = none), as in Broden; `ShapesWorld.concepts` lists them.
Samples are generated on the fly and depend only on (seed, index), so any worker can draw any item.
Drawing is vectorised numpy over a cached pixel grid: about a millisecond per 64x64 image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptlens.handlers.errors import InvalidInput

from .shapes_catalog import (
    BACKGROUND_COLORS,
    CLASS_PARTS,
    OBJECT_COLORS,
    PART_COLORS,
    STRAY_PARTS,
    TEXTURES,
    Shape,
    part_names,
)

CATEGORIES: tuple[str, ...] = ("object", "part", "color", "texture")
SHAPES_CLASSES: list[str] = list(CLASS_PARTS)
PART_NAMES: list[str] = part_names()
COLOR_NAMES: list[str] = list(OBJECT_COLORS) + list(BACKGROUND_COLORS)
MIN_SIZE = 16  # below this the thinnest parts vanish

# Global concept ids: objects, then parts, colours, textures; 0 means "no concept".
_CONCEPTS: list[tuple[int, str, str]] = []
for _category, _names in (("object", SHAPES_CLASSES), ("part", PART_NAMES), ("color", COLOR_NAMES),
                          ("texture", list(TEXTURES))):
    _CONCEPTS.extend((len(_CONCEPTS) + 1, _name, _category) for _name in _names)
CONCEPT_ID: dict[tuple[str, str], int] = {(cat, name): cid for cid, name, cat in _CONCEPTS}

_PALETTE = np.array([*OBJECT_COLORS.values(), *BACKGROUND_COLORS.values()], dtype=np.uint8)  # index = colour index
_COLOR_INDEX = {name: i for i, name in enumerate(COLOR_NAMES)}
_COLOR_CONCEPT = np.array([CONCEPT_ID["color", n] for n in COLOR_NAMES], dtype=np.int64)


@dataclass(frozen=True)
class DrawnPart:
    """One drawn part: its name, colour name, and whether it belongs to the object or is a distractor."""

    name: str  # part name, or "blob" for an unnamed distractor
    color: str
    role: str  # "object" | "distractor"


@dataclass
class ShapesSample:
    """One sample with its full annotation (what the Broden writer and the mask tests need)."""

    image: np.ndarray  # (H, W, 3) uint8
    label: int
    class_name: str
    texture: str
    background: np.ndarray  # (H, W, 3) uint8: the background layer alone, before anything was drawn on it
    masks: dict[str, np.ndarray]  # category -> (H, W) int64 global concept ids, 0 = none
    parts: list[DrawnPart] = field(default_factory=list)
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # tight box of the object's pixels: x0, y0, x1, y1 (exclusive)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32; read-only so the cache cannot be corrupted."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


class _Placement:
    """Object-local (u, v) -> pixel (x, y): scale, stretch, mirror, offset."""

    def __init__(self, x0: float, y0: float, width: float, height: float, mirror: bool) -> None:
        self.x0, self.y0, self.w, self.h, self.mirror = x0, y0, width, height, mirror

    def x(self, u: float) -> float:
        return self.x0 + (1.0 - u if self.mirror else u) * self.w

    def y(self, v: float) -> float:
        return self.y0 + v * self.h


def _shape_mask(shape: Shape, at: _Placement, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape, evaluated on the whole pixel grid (vectorised, no per-pixel loop)."""
    kind = shape[0]
    if kind == "rect":
        _, u0, v0, u1, v1 = shape
        xa, xb = sorted((at.x(u0), at.x(u1)))
        return (xs >= xa) & (xs < xb) & (ys >= at.y(v0)) & (ys < at.y(v1))
    if kind == "circle":
        _, cu, cv, r = shape
        rx, ry = max(r * at.w, 0.75), max(r * at.h, 0.75)
        return ((xs - at.x(cu)) / rx) ** 2 + ((ys - at.y(cv)) / ry) ** 2 <= 1.0
    if kind == "poly":
        pts = [(at.x(u), at.y(v)) for u, v in shape[1]]
        pos = np.ones(xs.shape, dtype=bool)
        neg = np.ones(xs.shape, dtype=bool)
        for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1], strict=True):
            cross = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
            pos &= cross >= 0
            neg &= cross <= 0
        return pos | neg  # inside a convex polygon whichever way the mirror turned it
    if kind == "line":
        _, u0, v0, u1, v1, width = shape
        ax, ay, bx, by = at.x(u0), at.y(v0), at.x(u1), at.y(v1)
        dx, dy = bx - ax, by - ay
        t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        half = max(width * (at.w + at.h) / 4.0, 0.75)  # at least ~1.5 px wide
        return (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2 <= half * half
    raise ValueError(f"unknown shape kind {kind!r}")


def _texture_pattern(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: True where the texture's second colour shows."""
    xs, ys = _grid(size)
    unit = size / 64.0
    if texture == "plain":
        return np.zeros((size, size), dtype=bool)
    if texture == "striped":
        period = rng.uniform(5.0, 10.0) * unit
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        return (proj // (period / 2)).astype(np.int64) % 2 == 1
    if texture == "checkered":
        cell = rng.uniform(4.0, 8.0) * unit
        return ((xs // cell).astype(np.int64) + (ys // cell).astype(np.int64)) % 2 == 1
    if texture == "dotted":
        period = rng.uniform(6.0, 10.0) * unit
        radius = period * rng.uniform(0.2, 0.32)
        return (xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2 <= radius * radius
    if texture == "noisy":
        block = max(1, round(float(rng.choice([1, 2, 3])) * unit))
        cells = -(-size // block)
        bits = rng.random((cells, cells)) < 0.5
        return np.kron(bits, np.ones((block, block), dtype=bool))[:size, :size]
    if texture == "grid":
        period = rng.uniform(7.0, 12.0) * unit
        width = max(1.0, 1.5 * unit)
        return ((xs % period) < width) | ((ys % period) < width)
    raise ValueError(f"unknown texture {texture!r}")


def _pick_colors(names: list[str], rng: np.random.Generator) -> dict[str, str]:
    """A colour per part name, distinct within the object where the part's options allow it."""
    used: set[str] = set()
    chosen: dict[str, str] = {}
    for name in names:
        options = [c for c in PART_COLORS[name] if c not in used] or list(PART_COLORS[name])
        chosen[name] = options[int(rng.integers(len(options)))]
        used.add(chosen[name])
    return chosen


def render_sample(seed: int, index: int, size: int = 64) -> ShapesSample:
    """Draw sample `index` of the world with this seed: a pure function of (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    xs, ys = _grid(size)
    label = index % len(SHAPES_CLASSES)  # balanced classes; the image itself is random
    class_name = SHAPES_CLASSES[label]

    # Background: two distinct pale colours in a texture.
    bg_names = list(BACKGROUND_COLORS)
    first, second = rng.choice(len(bg_names), size=2, replace=False)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    pattern = _texture_pattern(texture, size, rng)
    color = np.where(pattern, _COLOR_INDEX[bg_names[second]], _COLOR_INDEX[bg_names[first]]).astype(np.int64)
    background = _PALETTE[color]
    part = np.zeros((size, size), dtype=np.int64)
    obj = np.zeros((size, size), dtype=np.int64)
    visible_bg = np.ones((size, size), dtype=bool)
    drawn: list[DrawnPart] = []

    # Distractors first, so the object covers them where they overlap.
    for _ in range(int(rng.integers(0, 3))):
        extent = rng.uniform(0.14, 0.26) * size
        at = _Placement(rng.uniform(0, size - extent), rng.uniform(0, size - extent), extent, extent, False)
        if rng.random() < 0.5:
            name = list(STRAY_PARTS)[int(rng.integers(len(STRAY_PARTS)))]
            cname = PART_COLORS[name][int(rng.integers(len(PART_COLORS[name])))]
            mask = _shape_mask(STRAY_PARTS[name], at, xs, ys)
            part[mask] = CONCEPT_ID["part", name]
        else:
            name, cname = "blob", list(OBJECT_COLORS)[int(rng.integers(len(OBJECT_COLORS)))]
            squashed = _Placement(at.x0, at.y0, at.w, at.h * rng.uniform(0.5, 1.0), False)
            mask = _shape_mask(("circle", 0.5, 0.5, 0.5), squashed, xs, ys)
            part[mask] = 0
        color[mask] = _COLOR_INDEX[cname]
        visible_bg &= ~mask
        drawn.append(DrawnPart(name, cname, "distractor"))

    # The object: scale, stretch, mirror, place inside the image.
    scale = rng.uniform(0.55, 0.9) * size
    width = scale * rng.uniform(0.85, 1.1)
    height = scale * rng.uniform(0.85, 1.1)
    width, height = min(width, size - 1.0), min(height, size - 1.0)
    mirror = bool(rng.random() < 0.5)
    at = _Placement(rng.uniform(0, size - width), rng.uniform(0, size - height), width, height, mirror)
    parts = CLASS_PARTS[class_name]
    colors = _pick_colors([name for name, _ in parts], rng)
    class_id = CONCEPT_ID["object", class_name]
    for name, shapes in parts:
        mask = np.zeros((size, size), dtype=bool)
        for shape in shapes:
            mask |= _shape_mask(shape, at, xs, ys)
        color[mask] = _COLOR_INDEX[colors[name]]
        part[mask] = CONCEPT_ID["part", name]
        obj[mask] = class_id
        visible_bg &= ~mask
        drawn.append(DrawnPart(name, colors[name], "object"))

    masks = {
        "object": obj,
        "part": part,
        "color": _COLOR_CONCEPT[color],
        "texture": np.where(visible_bg, CONCEPT_ID["texture", texture], 0).astype(np.int64),
    }
    ys_obj, xs_obj = np.nonzero(obj)
    bbox = (int(xs_obj.min()), int(ys_obj.min()), int(xs_obj.max()) + 1, int(ys_obj.max()) + 1)
    return ShapesSample(_PALETTE[color], label, class_name, texture, background, masks, drawn, bbox)


class ShapesWorld(Dataset):
    """`n` ShapesWorld images of `size`², generated on the fly, deterministic per (seed, index).

    Items: (image float32 (3, size, size) in [0,1], label int), or with `with_masks=True`
    (image, label, masks) where masks maps each of `CATEGORIES` to an int64 (size, size) tensor of global
    concept ids (0 = none). Labels are balanced: item i has class i mod len(classes).

    >>> ds = ShapesWorld(100, size=64, seed=0, with_masks=True)
    >>> image, label, masks = ds[3]
    """

    categories: tuple[str, ...] = CATEGORIES

    def __init__(self, n: int, size: int = 64, seed: int = 0, with_masks: bool = False) -> None:
        if int(n) <= 0:
            raise InvalidInput("n", f"must be a positive number of images, got {n}")
        if int(size) < MIN_SIZE:
            raise InvalidInput("size", f"must be at least {MIN_SIZE} pixels, got {size}")
        self.n, self.size, self.seed, self.with_masks = int(n), int(size), int(seed), bool(with_masks)

    @property
    def classes(self) -> list[str]:
        return list(SHAPES_CLASSES)

    @property
    def concepts(self) -> list[tuple[int, str, str]]:
        """(concept id, name, category) for every concept, ids 1.. in a fixed order."""
        return list(_CONCEPTS)

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> ShapesSample:
        """The full annotation of one sample (numpy arrays, drawn parts, texture, background layer)."""
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        return render_sample(self.seed, index % self.n, self.size)

    def __getitem__(self, index: int) -> tuple:
        sample = self.render(index)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255.0)
        if not self.with_masks:
            return image, sample.label
        return image, sample.label, {cat: torch.from_numpy(sample.masks[cat]) for cat in CATEGORIES}

    def __repr__(self) -> str:
        return f"ShapesWorld(n={self.n}, size={self.size}, seed={self.seed}, with_masks={self.with_masks})"
