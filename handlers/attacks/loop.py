"""The one iterative loop every gradient attack uses (PGD, MI-FGSM, FGSM, the ensemble and ghost attacks).

Attacks differ only in the objective they pass in (which model, which loss) and in an optional gradient
transform (momentum); the threat model is the step object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .steps import L2Step, LinfStep

Objective = Callable[[torch.Tensor], torch.Tensor]  # images -> per-sample loss (N,) to ascend
Transform = Callable[[torch.Tensor], torch.Tensor]  # raw gradient -> gradient the step follows
Callback = Callable[[int], None]  # called with the step index before every step; raising stops the attack


def iterate(
    x0: torch.Tensor,
    step: LinfStep | L2Step,
    objective: Objective,
    steps: int,
    *,
    random_start: bool = False,
    transform: Transform | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ascend `objective` from x0 for `steps` steps, projecting onto the step's ε-ball and [0,1] after each.

    `callback(i)` runs before step i (e.g. a deadline check that raises); the loop holds no state to clean up.
    """
    x0 = x0.detach()
    x = step.random_perturb(x0, generator) if random_start else x0.clone()
    for i in range(steps):
        if callback is not None:
            callback(i)
        x.requires_grad_(True)
        loss = objective(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if transform is not None:
            grad = transform(grad)
        with torch.no_grad():
            x = step.project(step.step(x, grad), x0)
    return x.detach()


class Momentum:
    """MI-FGSM's accumulator: g ← μ·g + ∇/‖∇‖₁ (per sample). One instance per attack call."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.g: torch.Tensor | None = None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        l1 = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        self.g = grad / l1 if self.g is None else self.decay * self.g + grad / l1
        return self.g
