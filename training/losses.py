"""The consistent loss (docs/design.md §5): CE(f(x), y) + α·CE(f(x*), y) + λ·Σ_l D(φ_l(x), φ_l(x*)).

Every distance D maps a clean and an adversarial activation batch of the same shape (N, ...) to one scalar, the
mean over the batch of a per-sample distance. The default is scale-free so that λ means the same thing for
every layer and architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conceptlens.handlers.errors import InvalidInput, UnknownName

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_TINY = 1e-12  # keeps an all-zero clean map (a dead layer) from dividing by zero


def relative_squared(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ‖a − a*‖² / ‖a‖², a = the clean map.

    The clean norm is a per-sample scale, not a target, so it is detached: otherwise the loss could be lowered
    by inflating the clean activations instead of making the adversarial ones agree with them.
    """
    a, b = clean.flatten(1).float(), adv.flatten(1).float()
    return ((a - b).pow(2).sum(1) / a.detach().pow(2).sum(1).clamp_min(_TINY)).mean()


def mse(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per element (not scale-free: λ must be tuned per layer)."""
    return F.mse_loss(adv.float(), clean.float())


def cosine(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 1 − cos(a, a*): ignores the magnitude, only the direction of the map counts."""
    return (1 - F.cosine_similarity(clean.flatten(1).float(), adv.flatten(1).float(), dim=1, eps=1e-8)).mean()


DISTANCES: dict[str, Distance] = {"relative": relative_squared, "mse": mse, "cosine": cosine}


def distance(name: str) -> Distance:
    if name not in DISTANCES:
        raise UnknownName("distance", name, DISTANCES)
    return DISTANCES[name]


@dataclass
class LossTerms:
    """The total and every term it is made of (unweighted), for logging. Absent terms are zero tensors."""

    total: torch.Tensor
    ce_clean: torch.Tensor
    ce_adv: torch.Tensor
    consistency: torch.Tensor
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        out = {
            "loss": float(self.total), "ce_clean": float(self.ce_clean), "ce_adv": float(self.ce_adv),
            "consistency": float(self.consistency),
        }
        out.update({f"consistency/{name}": float(v) for name, v in self.per_layer.items()})
        return out


def consistency_term(
    clean: Mapping[str, torch.Tensor], adv: Mapping[str, torch.Tensor], dist: Distance = relative_squared
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_l D(φ_l(x), φ_l(x*)) over the layers of `clean`, and each layer's D."""
    if set(clean) != set(adv):
        raise InvalidInput("layers", f"clean has {sorted(clean)}, adversarial has {sorted(adv)}")
    per_layer = {}
    for name, a in clean.items():
        if a.shape != adv[name].shape:
            raise InvalidInput(name, f"clean shape {tuple(a.shape)} != adversarial {tuple(adv[name].shape)}")
        per_layer[name] = dist(a, adv[name])
    if not per_layer:
        raise InvalidInput("layers", "the consistency term needs at least one layer")
    return torch.stack(list(per_layer.values())).sum(), per_layer


def consistent_loss(
    logits_clean: torch.Tensor,
    labels: torch.Tensor,
    *,
    logits_adv: torch.Tensor | None = None,
    acts_clean: Mapping[str, torch.Tensor] | None = None,
    acts_adv: Mapping[str, torch.Tensor] | None = None,
    adv_weight: float = 1.0,
    consistency_weight: float = 0.0,
    dist: Distance = relative_squared,
) -> LossTerms:
    """The training loss of all three regimes.

    No adversarial logits: standard training, total = CE(f(x), y). With them and λ = 0 (or no activations):
    adversarial training, total = CE(f(x), y) + α·CE(f(x*), y). With λ > 0 the consistency term is added.
    """
    ce_clean = F.cross_entropy(logits_clean.float(), labels)
    zero = ce_clean.new_zeros(())
    if logits_adv is None:
        return LossTerms(ce_clean, ce_clean, zero, zero)
    ce_adv = F.cross_entropy(logits_adv.float(), labels)
    total = ce_clean + adv_weight * ce_adv
    if consistency_weight == 0 or acts_clean is None or acts_adv is None:
        return LossTerms(total, ce_clean, ce_adv, zero)
    cons, per_layer = consistency_term(acts_clean, acts_adv, dist)
    return LossTerms(total + consistency_weight * cons, ce_clean, ce_adv, cons, per_layer)
