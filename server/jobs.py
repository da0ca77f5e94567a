"""Work items passed from the servicer to the runners through the batchers (plain data, no torch)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

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
    cancel: threading.Event | None = None  # set when the call ended (client cancel, server stopping): tracing stops


@dataclass(frozen=True)
class ProbeAttack:
    """A validated AttackSpec (server/probe_validation.py). Exactly one of `eps` and `eps_range` is set."""

    kind: str  # attack registry name: fgsm, pgd, mifgsm, ghost-ensemble, square
    norm: str  # linf | l2
    eps: float | None  # fixed budget, [0,1] pixel units
    eps_range: tuple[float, float] | None  # minimal-ε search range
    tolerance: float
    steps: int  # iterations; Square: queries per image
    restarts: int
    step_size: float | None  # None: the attack's default fraction of ε
    target: int | None  # class index of a targeted attack
    seed: int
    random_start: bool
    members: tuple[Any, ...] = ()  # ghost-ensemble: other served models' runtimes
    ghosts: int = 2
    candidates: int = 8


@dataclass(frozen=True)
class ProbeJob:
    """One Probe request's decoded images, validated attack and trace options (see ProbeRequest in the proto)."""

    images: np.ndarray  # (n, C, H, W) float32 in [0, 1]
    attack: ProbeAttack
    layers: tuple[str, ...]  # network order
    top_k_units: int
    candidates: int  # hidden-layer exact Δ re-runs per layer
    deadline: float | None = None  # time.monotonic(); checked between attack steps and between images
    top_k: int = 5  # classes in each result's clean and adversarial predictions
    return_adversarial: bool = False  # results carry the adversarial image, its PNG and the perturbation map
