"""PGD: projected gradient descent with a random start and restarts, L∞ or L2.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInput
from .base import Attack, AttackParams, Eps, Predict, check_eps, check_steps, class_loss, per_sample, succeeded
from .loop import iterate
from .steps import make_step


class PGD(Attack):
    """Projected gradient ascent on the cross-entropy inside the ε-ball (norm "linf" or "l2").

    Step size `alpha` defaults to 2.5·ε/steps (Madry et al.): 2/255 for ε = 8/255 and 10 steps. With
    `restarts` > 1 each sample keeps its best restart: a successful one first, then the highest loss.
    `seed` makes the random start reproducible (a generator is reseeded on every call).

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).
    `eps` and `alpha` may be floats or (N,) tensors (one budget per sample).

    Example::

        atk = PGD(model, eps=8/255, steps=10)                      # L∞
        atk = PGD(model, eps=0.5, steps=20, norm="l2", restarts=3)
        result = atk(images, labels)
    """

    def __init__(
        self,
        model: Predict,
        eps: Eps = 8 / 255,
        alpha: Eps | None = None,
        steps: int = 10,
        *,
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps, targeted=targeted)
        check_steps(steps)
        check_steps(restarts, "restarts")
        if restarts > 1 and not random_start:
            raise InvalidInput("restarts", "restarts > 1 need random_start=True (they would all be identical)")
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        check_eps(self.alpha, "alpha")
        make_step(norm, torch.zeros(1), torch.zeros(1))  # fail now on an unknown norm
        self.steps, self.norm, self.random_start, self.restarts, self.seed = steps, norm, random_start, restarts, seed

    @classmethod
    def from_params(cls, model: Predict, params: AttackParams) -> PGD:
        return cls(model, params.eps, params.step_size, params.steps, norm=params.norm,
                   random_start=params.random_start and not params.deterministic, restarts=params.restarts,
                   targeted=params.targeted, seed=params.seed)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        step = make_step(self.norm, per_sample(self.eps, images), per_sample(self.alpha, images))
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=images.device).manual_seed(self.seed)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return class_loss(self.model(x), labels, target)

        best = best_loss = best_ok = None
        for _ in range(self.restarts):
            adv = iterate(images, step, objective, self.steps, random_start=self.random_start, generator=generator,
                          callback=self.callback)
            if self.restarts == 1:
                return adv
            with torch.no_grad():
                logits = self.model(adv)
            loss, ok = class_loss(logits, labels, target), succeeded(logits, labels, target)
            if best is None:
                best, best_loss, best_ok = adv, loss, ok
                continue
            better = (ok & ~best_ok) | ((ok == best_ok) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
            best_loss, best_ok = torch.where(better, loss, best_loss), best_ok | ok
        return best
