"""Threat models as step objects (after MadryLab/robustness `attack_steps.py`): each knows how to take a step
along a gradient, project back onto its ε-ball around the clean images and [0,1], and draw a random start.

`eps` and `alpha` are (N,1,1,1) tensors (see `base.per_sample`), so one batch may mix budgets: the minimal-ε
search runs every candidate ε of every sample in one pass.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped (N,1,1,1) to broadcast."""
    return t.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t.dim() - 1)))


class LinfStep:
    """‖δ‖∞ ≤ ε: signed-gradient steps, coordinate-wise clipping."""

    norm = "linf"

    def __init__(self, eps: torch.Tensor, alpha: torch.Tensor) -> None:
        self.eps, self.alpha = eps, alpha

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (x0 + torch.maximum(torch.minimum(x - x0, self.eps), -self.eps)).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * grad.sign()

    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return (x + noise * self.eps).clamp(0, 1)


class L2Step:
    """‖δ‖₂ ≤ ε: steps of length α along the per-sample normalised gradient, radial projection.

    Clipping to [0,1] after the radial projection only moves coordinates towards x0, so δ stays in the ball.
    """

    norm = "l2"

    def __init__(self, eps: torch.Tensor, alpha: torch.Tensor) -> None:
        self.eps, self.alpha = eps, alpha

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        delta = x - x0
        scale = torch.clamp(self.eps / _norms(delta), max=1.0)
        return (x0 + delta * scale).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * grad / _norms(grad)

    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # A uniform direction with a radius uniform in [0, ε] (torchattacks' PGDL2 start).
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x + direction / _norms(direction) * radius * self.eps, x)


STEPS: dict[str, type[LinfStep] | type[L2Step]] = {"linf": LinfStep, "l2": L2Step}


def make_step(norm: str, eps: torch.Tensor, alpha: torch.Tensor) -> LinfStep | L2Step:
    """The step object for `norm` ("linf" or "l2")."""
    from ..errors import UnknownName

    if norm not in STEPS:
        raise UnknownName("norm", norm, STEPS)
    return STEPS[norm](eps, alpha)
