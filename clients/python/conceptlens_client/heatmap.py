"""Heatmap overlays with numpy + Pillow only: the image, then one panel per top unit with its activation map
blended over the image and labelled with the unit's concept."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .v1 import conceptlens_service_pb2 as pb

PANEL = 192


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0,1] values to RGB (a simple blue-cyan-yellow-red ramp), shape (..., 3) uint8."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 20, 0]], dtype=np.float32)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, unit: pb.UnitInfluence, size: int = PANEL) -> Image.Image:
    """One panel: the unit's map (normalised to its own range) over the image, with a caption."""
    base = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    values = np.asarray(unit.map.values, dtype=np.float32).reshape(unit.map.height, unit.map.width)
    span = float(values.max() - values.min())
    norm = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    heat = Image.fromarray(_colormap(norm)).resize((size, size), Image.Resampling.BILINEAR)
    panel = Image.blend(base, heat, 0.5)
    caption = f"{unit.layer}#{unit.unit} {unit.concept or 'unlabelled'}"  # ASCII: Pillow's default font
    if unit.concept:
        caption += f" IoU {unit.iou:.2f}"
    caption += f" d={unit.delta:+.2f}"
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, size - 14, size, size), fill=(0, 0, 0))
    draw.text((3, size - 13), caption, fill=(255, 255, 255))
    return panel


def heatmap(image: Image.Image, units: Sequence[pb.UnitInfluence], title: str, out: Path) -> Path:
    """Write the image plus one overlay per unit (those carrying maps) side by side to `out`."""
    panels = [image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BILINEAR)]
    panels += [overlay(image, u) for u in units if u.HasField("map")]
    sheet = Image.new("RGB", (PANEL * len(panels), PANEL + 16), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * PANEL, 16))
    ImageDraw.Draw(sheet).text((3, 2), title, fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
