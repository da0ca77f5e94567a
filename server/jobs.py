"""Work items passed from the servicer to the runners through the batchers (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExplainJob:
    """One Explain request's decoded images and validated trace options (see ExplainRequest in the proto)."""

    images: np.ndarray  # (n, C, H, W) float32 in [0, 1]
    layers: tuple[str, ...]  # network order
    top_k_units: int
    target: int | None
    include_maps: bool
    map_size: int
    depth: int
    candidates: int
    deadline: float | None = None  # time.monotonic(); checked between images, as hidden-layer traces take long
