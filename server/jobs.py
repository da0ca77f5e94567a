"""Work items passed from the servicer to the runners through the batchers (plain data). A probe's attack is
the one probe spec type, `handlers.probe.ProbeSpec`, from the request's validation to the attack itself."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from conceptlens.handlers.probe import ProbeSpec


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
    cancel: threading.Event | None = None  # set when the call ended (client cancel, server stopping): tracing stops


@dataclass(frozen=True)
class ProbeJob:
    """One Probe request's decoded images, validated attack and trace options (see ProbeRequest in the proto)."""

    images: np.ndarray  # (n, C, H, W) float32 in [0, 1]
    attack: ProbeSpec  # validated by server/probe_validation.py
    layers: tuple[str, ...]  # network order
    top_k_units: int
    candidates: int  # hidden-layer exact Δ re-runs per layer
    deadline: float | None = None  # time.monotonic(); checked between attack steps and between images
    top_k: int = 5  # classes in each result's clean and adversarial predictions
    return_adversarial: bool = False  # results carry the adversarial image, its PNG and the perturbation map
