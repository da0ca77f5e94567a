"""Class-specific gates (CSG regime, docs/design.md §5.2): Liang, Wang, Zhou & Huang, "Training Interpretable
Convolutional Neural Networks by Differentiating Class-specific Filters", ECCV 2020.

A learnable gate G ∈ [0, 1]^{K×C} (classes × filters of the last conv layer). In a gated step a class-y sample's
feature maps are multiplied channel-wise by G[y], so each filter is pushed to serve the few classes whose gates
stay open; the sparsity loss relu(‖G‖₁ − s·|G|) (s = 0.2 in the paper) keeps at most a fraction s of the gate's
mass, and after every optimiser step G is renormalised by each filter's maximum over classes and clipped to
[0, 1]. Gated and ungated epochs alternate, so the network also learns to classify without the gate, which it
must: the gate needs the label, so it exists in training only and is never part of the exported model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from conceptlens.handlers.hooks import override


class ClassGate(nn.Module):
    """G ∈ [0, 1]^{classes × channels}, initialised open (all ones)."""

    def __init__(self, classes: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(classes, channels))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features (N, C, h, w) multiplied channel-wise by G[labels] (N, C)."""
        return features * self.weight[labels].to(features.dtype)[:, :, None, None]

    def sparsity_loss(self, sparsity: float) -> torch.Tensor:
        """relu(‖G‖₁ − s·|G|): zero while at most a fraction `sparsity` of the gate's possible mass is open."""
        return torch.relu(self.weight.abs().sum() - sparsity * self.weight.numel())

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Divide each filter's column by its maximum over classes, then clip to [0, 1] (after every step)."""
        peak = self.weight.max(dim=0, keepdim=True).values.clamp_min(1e-12)
        self.weight.div_(peak).clamp_(0.0, 1.0)

    def density(self) -> float:
        """‖G‖₁ / |G|: the open fraction the sparsity loss aims at."""
        return float(self.weight.detach().abs().mean())


@contextmanager
def gated(model: nn.Module, layer: str, gate: ClassGate, labels: torch.Tensor) -> Iterator[None]:
    """Forward passes inside the context have `layer`'s output multiplied by the gate rows of `labels` (one label per
    sample of the batch that will be forwarded). The hook is removed on the way out, even on errors."""
    with override(model, layer, lambda out: gate(out, labels)):
        yield
