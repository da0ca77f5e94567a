"""MI-FGSM: iterative signed steps along an accumulated, L1-normalised gradient.

Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018.
"""

from __future__ import annotations

import torch

from .base import Attack, AttackParams, Eps, Predict, check_eps, check_steps, class_loss, per_sample
from .loop import Momentum, Objective, iterate
from .steps import make_step


class MIFGSM(Attack):
    """Momentum iterative FGSM: g ← μ·g + ∇/‖∇‖₁, x ← Π(x + α·sign g). Norm: L∞ (or "l2").

    `alpha` defaults to ε/steps, `decay` (μ) to 1.0 as in the paper. No random start.

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).

    Example::

        atk = MIFGSM(model, eps=8/255, steps=10, decay=1.0)
        result = atk(images, labels)
    """

    def __init__(
        self,
        model: Predict,
        eps: Eps = 8 / 255,
        alpha: Eps | None = None,
        steps: int = 10,
        *,
        decay: float = 1.0,
        norm: str = "linf",
        targeted: bool = False,
    ) -> None:
        super().__init__(model, eps, targeted=targeted)
        check_steps(steps)
        check_eps(decay, "decay")
        self.alpha = eps / steps if alpha is None else alpha
        check_eps(self.alpha, "alpha")
        make_step(norm, torch.zeros(1), torch.zeros(1))
        self.steps, self.decay, self.norm = steps, decay, norm

    @classmethod
    def from_params(cls, model: Predict, params: AttackParams) -> MIFGSM:
        return cls(model, params.eps, params.step_size, params.steps, norm=params.norm, targeted=params.targeted)

    def objective(self, labels: torch.Tensor, target: torch.Tensor | None) -> Objective:
        """The loss ascended at each step; the ensemble and ghost attacks change only the model behind it."""
        source = getattr(self, "source", self.model)
        return lambda x: class_loss(source(x), labels, target)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        step = make_step(self.norm, per_sample(self.eps, images), per_sample(self.alpha, images))
        return iterate(images, step, self.objective(labels, target), self.steps, transform=Momentum(self.decay),
                       callback=self.callback)
