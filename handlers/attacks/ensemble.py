"""The ensemble-optimization attack: one perturbation for several models at once.

Liu, Chen, Liu & Song, "Delving into Transferable Adversarial Examples and Black-box Attacks", ICLR 2017
(the weighted logit ensemble), optimised with MI-FGSM (Dong et al., CVPR 2018), as in docs/design.md §5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidInput
from .base import Eps, Predict, expected_channels
from .mifgsm import MIFGSM


class LogitEnsemble:
    """Callable returning Σᵢ wᵢ·modelᵢ(x) with weights normalised to sum to 1 (the weighted mean of logits)."""

    def __init__(self, members: Sequence[Predict], weights: Sequence[float] | None = None) -> None:
        if len(members) == 0:
            raise InvalidInput("models", "an ensemble needs at least one model")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise InvalidInput("weights", f"expected {len(members)} weights (one per model), got {len(weights)}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise InvalidInput("weights", f"must be >= 0 with a positive sum, got {weights}")
        total = float(sum(weights))
        self.members, self.weights = list(members), [w / total for w in weights]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for w, member in zip(self.weights, self.members, strict=True):
            if w == 0:
                continue
            term = w * member(x)
            out = term if out is None else out + term
        return out


class EnsembleAttack(MIFGSM):
    """MI-FGSM on the cross-entropy of the weighted mean logits of `models`, untargeted or targeted. Norm: L∞.

    Success and the returned logits are judged on the same ensemble. Members may be any callables taking
    [0,1] images, e.g. `GhostNetwork`s of one model (redrawn at every step).

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).

    Example::

        atk = EnsembleAttack([resnet, vgg, cnn], weights=[1, 1, 2], eps=8/255, steps=10)
        result = atk(images, labels)                                  # one δ that fools the mix
        result = EnsembleAttack(models, targeted=True)(images, labels, target=target)
    """

    def __init__(
        self,
        models: Sequence[Predict],
        weights: Sequence[float] | None = None,
        eps: Eps = 8 / 255,
        alpha: Eps | None = None,
        steps: int = 10,
        *,
        decay: float = 1.0,
        targeted: bool = False,
    ) -> None:
        ensemble = LogitEnsemble(models, weights)
        super().__init__(ensemble, eps, alpha, steps, decay=decay, targeted=targeted)
        self.source = ensemble

    def models(self) -> Sequence[object]:
        return [*self.source.members, self.model]

    def channels(self) -> int | None:
        found = {expected_channels(m) for m in self.source.members} - {None}
        return found.pop() if len(found) == 1 else None
