"""What ShapesWorld draws: object classes as named parts, the colour palette and the background textures.

Everything here is data, kept apart from the drawing code so the concept list (and thus every concept id) is
visible in one place. Geometry is in object-local units: (u, v) in [0, 1]², u to the right, v downwards; the
renderer scales, stretches, flips and places it. Parts shared between classes (wheel, window, handle, pole) are
what lets a unit be a part detector without being a class detector.

Shapes:
    ("rect", u0, v0, u1, v1)            axis-aligned box
    ("circle", cu, cv, r)               disc (an ellipse once the object is stretched)
    ("poly", ((u, v), ...))             convex polygon
    ("line", u0, v0, u1, v1, width)     thick segment
"""

from __future__ import annotations

import math

Shape = tuple
Part = tuple[str, tuple[Shape, ...]]  # (part name, shapes drawn in that part's colour)


def _petals(cu: float, cv: float, dist: float, r: float, count: int) -> tuple[Shape, ...]:
    return tuple(
        ("circle", cu + dist * math.cos(2 * math.pi * k / count), cv + dist * math.sin(2 * math.pi * k / count), r)
        for k in range(count)
    )


# class -> parts in drawing order (later parts cover earlier ones).
CLASS_PARTS: dict[str, tuple[Part, ...]] = {
    "car": (
        ("body", (("rect", 0.0, 0.42, 1.0, 0.75), ("rect", 0.2, 0.16, 0.8, 0.45))),
        ("window", (("rect", 0.27, 0.23, 0.47, 0.41), ("rect", 0.53, 0.23, 0.73, 0.41))),
        ("wheel", (("circle", 0.22, 0.76, 0.14), ("circle", 0.78, 0.76, 0.14))),
    ),
    "bicycle": (
        ("wheel", (("circle", 0.2, 0.7, 0.19), ("circle", 0.8, 0.7, 0.19))),
        (
            "frame",
            (
                ("line", 0.2, 0.7, 0.42, 0.38, 0.07),
                ("line", 0.42, 0.38, 0.74, 0.38, 0.07),
                ("line", 0.74, 0.38, 0.8, 0.7, 0.07),
                ("line", 0.2, 0.7, 0.52, 0.7, 0.07),
                ("line", 0.42, 0.38, 0.52, 0.7, 0.07),
            ),
        ),
        ("seat", (("rect", 0.3, 0.22, 0.5, 0.3), ("line", 0.42, 0.28, 0.42, 0.38, 0.05))),
        ("handle", (("line", 0.74, 0.38, 0.72, 0.18, 0.06), ("line", 0.64, 0.18, 0.82, 0.18, 0.06))),
    ),
    "cart": (
        ("box", (("rect", 0.08, 0.3, 0.74, 0.66),)),
        ("wheel", (("circle", 0.27, 0.74, 0.12), ("circle", 0.58, 0.74, 0.12))),
        ("handle", (("line", 0.72, 0.36, 0.92, 0.1, 0.07), ("line", 0.86, 0.1, 1.0, 0.1, 0.07))),
    ),
    "house": (
        ("wall", (("rect", 0.14, 0.45, 0.86, 1.0),)),
        ("roof", (("poly", ((0.02, 0.47), (0.98, 0.47), (0.5, 0.04))),)),
        ("door", (("rect", 0.43, 0.66, 0.6, 1.0),)),
        ("window", (("rect", 0.2, 0.56, 0.36, 0.72), ("rect", 0.66, 0.56, 0.8, 0.72))),
    ),
    "tree": (
        ("trunk", (("rect", 0.41, 0.55, 0.59, 1.0),)),
        ("crown", (("circle", 0.5, 0.36, 0.35),)),
    ),
    "flower": (
        ("stem", (("line", 0.5, 0.4, 0.5, 1.0, 0.07), ("poly", ((0.5, 0.75), (0.78, 0.6), (0.62, 0.8))))),
        ("petal", _petals(0.5, 0.3, 0.18, 0.12, 6)),
        ("center", (("circle", 0.5, 0.3, 0.1),)),
    ),
    "rocket": (
        ("fuselage", (("rect", 0.36, 0.24, 0.64, 0.86),)),
        ("nose", (("poly", ((0.36, 0.25), (0.64, 0.25), (0.5, 0.0))),)),
        (
            "fin",
            (
                ("poly", ((0.36, 0.58), (0.36, 0.88), (0.14, 0.99))),
                ("poly", ((0.64, 0.58), (0.64, 0.88), (0.86, 0.99))),
            ),
        ),
        ("window", (("rect", 0.43, 0.36, 0.57, 0.5),)),
    ),
    "boat": (
        ("hull", (("poly", ((0.0, 0.66), (1.0, 0.66), (0.82, 0.93), (0.18, 0.93))),)),
        ("pole", (("line", 0.5, 0.04, 0.5, 0.67, 0.06),)),
        (
            "sail",
            (("poly", ((0.55, 0.07), (0.55, 0.6), (0.94, 0.6))), ("poly", ((0.45, 0.16), (0.45, 0.6), (0.14, 0.6)))),
        ),
    ),
    "lamp": (
        ("pole", (("line", 0.45, 0.12, 0.45, 0.92, 0.07), ("line", 0.45, 0.12, 0.74, 0.12, 0.06))),
        ("base", (("rect", 0.28, 0.88, 0.62, 1.0),)),
        ("bulb", (("circle", 0.74, 0.24, 0.11),)),
    ),
}

# Object colours are saturated, background colours pale: the two sets never meet, so an object pixel can
# always be told from a background pixel by its colour alone (tests rely on it).
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (35, 150, 45),
    "blue": (35, 70, 205),
    "yellow": (235, 205, 25),
    "orange": (240, 135, 20),
    "purple": (130, 45, 165),
    "brown": (115, 70, 30),
    "black": (20, 20, 20),
    "gray": (115, 115, 115),
    "white": (250, 250, 250),
    "cyan": (60, 200, 225),
    "pink": (235, 95, 165),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "beige": (232, 218, 180),
    "sky": (175, 208, 240),
    "mint": (188, 234, 198),
    "lavender": (214, 198, 236),
    "silver": (196, 196, 196),
    "peach": (246, 198, 166),
}

# Plausible colours per part (a wheel is black or gray, a crown green or orange...): random, yet learnable.
PART_COLORS: dict[str, tuple[str, ...]] = {
    "body": ("red", "blue", "yellow", "green", "orange", "purple"),
    "window": ("cyan", "white"),
    "wheel": ("black", "gray"),
    "frame": ("red", "blue", "green", "orange", "purple"),
    "seat": ("black", "brown"),
    "handle": ("black", "brown", "gray"),
    "box": ("brown", "orange", "red", "yellow"),
    "wall": ("red", "yellow", "orange", "gray", "white"),
    "roof": ("red", "brown", "black", "purple"),
    "door": ("brown", "black", "blue"),
    "trunk": ("brown",),
    "crown": ("green", "orange"),
    "stem": ("green",),
    "petal": ("red", "pink", "yellow", "purple", "blue", "orange"),
    "center": ("yellow", "orange", "brown"),
    "fuselage": ("gray", "white", "red", "blue"),
    "nose": ("red", "orange", "black"),
    "fin": ("red", "orange", "blue", "black"),
    "hull": ("brown", "red", "blue", "black"),
    "pole": ("black", "gray", "brown"),
    "sail": ("white", "red", "yellow"),
    "base": ("black", "gray"),
    "bulb": ("yellow", "orange"),
}

# Stray parts drawn as distractors: the part alone, not an object (labelled as part, never as object).
STRAY_PARTS: dict[str, Shape] = {
    "wheel": ("circle", 0.5, 0.5, 0.5),
    "window": ("rect", 0.0, 0.1, 1.0, 0.9),
    "door": ("rect", 0.2, 0.0, 0.8, 1.0),
    "roof": ("poly", ((0.0, 0.9), (1.0, 0.9), (0.5, 0.1))),
}

TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "grid")


def part_names() -> list[str]:
    """Every part name, each once, in first-appearance order (stable: it fixes the concept ids)."""
    seen: dict[str, None] = {}
    for parts in CLASS_PARTS.values():
        for name, _ in parts:
            seen.setdefault(name, None)
    return list(seen)
