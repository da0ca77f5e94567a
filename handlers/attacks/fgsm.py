"""FGSM: one signed-gradient step of size ε.

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
"""

from __future__ import annotations

import torch

from .base import Attack, AttackParams, Eps, Predict, class_loss, per_sample
from .loop import iterate
from .steps import make_step


class FGSM(Attack):
    """Fast gradient sign method. Norm: L∞ (``norm="l2"`` gives the fast gradient method, one step of length ε).

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).

    Example::

        atk = FGSM(model, eps=8/255)
        result = atk(images, labels)        # result.adv, result.success, result.eps, result.logits
    """

    def __init__(self, model: Predict, eps: Eps = 8 / 255, *, norm: str = "linf", targeted: bool = False) -> None:
        super().__init__(model, eps, targeted=targeted)
        make_step(norm, torch.zeros(1), torch.zeros(1))  # fail now on an unknown norm, not mid-call
        self.norm = norm

    @classmethod
    def from_params(cls, model: Predict, params: AttackParams) -> FGSM:
        return cls(model, params.eps, norm=params.norm, targeted=params.targeted)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        eps = per_sample(self.eps, images)
        step = make_step(self.norm, eps, eps)
        return iterate(images, step, lambda x: class_loss(self.model(x), labels, target), 1,
                       callback=self.callback)
