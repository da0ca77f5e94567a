"""The consistency and specificity metrics of docs/design.md §5, as small functions over streamed statistics.

- unit consistency pᵀAp over a unit's top-K images of a pool (TopKPool keeps them streaming, bounded memory);
- representation consistency r = d(φ(x*), μ_s) / (d(φ(x*), μ_s) + d(φ(x*), μ_t));
- label stability of detectors between clean and adversarial dissection;
- class specificity MIS = mean_k max_c I(GAP(A_k); 1[y = c]), with I estimated from a joint histogram of GAP
  values in `bins` equal-width bins (range from the first pass) — a plug-in estimator, in nats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from conceptlens.handlers.errors import InvalidInput

from .labels import UnitLabel


class TopKPool:
    """Per unit, the K images with the highest max-over-positions activation seen so far (values, ids, classes)."""

    def __init__(self, units: int, k: int = 50) -> None:
        self.units, self.k = units, k
        self.values: torch.Tensor | None = None  # (units, <=k)
        self.ids: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None

    def update(self, peak: torch.Tensor, ids: torch.Tensor, classes: torch.Tensor) -> None:
        """peak (B, units): max_pos A_k per image; ids and classes (B,) identify and label the images."""
        v = peak.detach().float().t()  # (units, B)
        i = ids.to(v.device).view(1, -1).expand_as(v)
        c = classes.to(v.device).view(1, -1).expand_as(v)
        if self.values is not None:
            v, i, c = torch.cat([self.values, v], 1), torch.cat([self.ids, i], 1), torch.cat([self.classes, c], 1)
        top = torch.topk(v, min(self.k, v.shape[1]), dim=1)
        self.values, self.ids, self.classes = top.values, i.gather(1, top.indices), c.gather(1, top.indices)

    @staticmethod
    def merged(a: TopKPool, b: TopKPool) -> TopKPool:
        """The pool of a ∪ b (e.g. real ∪ adversarial)."""
        out = TopKPool(a.units, a.k)
        pools = [p for p in (a, b) if p.values is not None]
        if pools:
            v = torch.cat([p.values for p in pools], 1)
            i = torch.cat([p.ids for p in pools], 1)
            c = torch.cat([p.classes for p in pools], 1)
            top = torch.topk(v, min(out.k, v.shape[1]), dim=1)
            out.values, out.ids, out.classes = top.values, i.gather(1, top.indices), c.gather(1, top.indices)
        return out

    def __len__(self) -> int:
        return 0 if self.values is None else self.values.shape[1]


def unit_consistency(classes: torch.Tensor, num_classes: int, affinity: torch.Tensor | None = None) -> torch.Tensor:
    """consis(k) = pᵀAp for each row of `classes` (units, K): p the normalised class histogram of the top images."""
    counts = torch.nn.functional.one_hot(classes.long(), num_classes).sum(1).double()  # (units, C)
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    if affinity is None:
        return (p * p).sum(1)
    a = affinity.to(p.device, torch.float64)
    return torch.einsum("ui,ij,uj->u", p, a, p)


def load_affinity(path: str | Path, classes: Sequence[str]) -> torch.Tensor:
    """A symmetric class-affinity matrix A (A_ii = 1) from JSON: {"classes": [...], "matrix": [[...]]}.

    "classes" (optional) gives the row order; it must be a permutation of the model's classes.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput("--affinity", f"no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput("--affinity", f"{path} is not JSON: {err}") from None
    matrix = data.get("matrix") if isinstance(data, dict) else data
    order = data.get("classes", list(classes)) if isinstance(data, dict) else list(classes)
    try:
        a = torch.tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInput("--affinity", f"matrix is not numeric: {err}") from None
    n = len(classes)
    if a.shape != (n, n):
        raise InvalidInput("--affinity", f"matrix must be {n}×{n} (one row per class), got {tuple(a.shape)}")
    if sorted(order) != sorted(classes):
        raise InvalidInput("--affinity", f"classes {order} are not the model's classes {list(classes)}")
    perm = [order.index(c) for c in classes]
    a = a[perm][:, perm]
    if not torch.allclose(a, a.t()) or not torch.allclose(a.diagonal(), torch.ones(n, dtype=torch.float64)):
        raise InvalidInput("--affinity", "matrix must be symmetric with ones on the diagonal")
    return a


def representation_ratio(phi: torch.Tensor, mu_source: torch.Tensor, mu_target: torch.Tensor) -> torch.Tensor:
    """r per adversarial image: phi, mu_source, mu_target (B, D). < 0.5 follows the look, > 0.5 the attack."""
    ds = (phi - mu_source).flatten(1).norm(dim=1)
    dt = (phi - mu_target).flatten(1).norm(dim=1)
    return ds / (ds + dt).clamp(min=1e-12)


def class_specificity(hist: torch.Tensor) -> tuple[float, torch.Tensor]:
    """MIS from joint counts hist (units, bins, classes): returns (MIS, per-unit max_c MI in nats)."""
    h = hist.double()
    total = h.sum((1, 2), keepdim=True).clamp(min=1)  # (U,1,1)
    pos = h / total  # p(bin, y=c)
    neg = (h.sum(2, keepdim=True) - h) / total  # p(bin, y≠c)
    p_bin = h.sum(2, keepdim=True) / total  # (U,B,1)
    p_c = h.sum(1, keepdim=True) / total  # (U,1,C)

    def term(joint: torch.Tensor, marg: torch.Tensor) -> torch.Tensor:
        ratio = joint / (p_bin * marg).clamp(min=1e-300)
        return torch.where(joint > 0, joint * torch.log(ratio.clamp(min=1e-300)), torch.zeros_like(joint)).sum(1)

    mi = term(pos, p_c) + term(neg, 1 - p_c)  # (U, C)
    per_unit = mi.max(1).values.clamp(min=0)
    return float(per_unit.mean()), per_unit


def label_stability(clean: Sequence[UnitLabel], adv_iou: torch.Tensor) -> dict[str, float]:
    """Among clean detectors: fraction whose best label on adversarial images is unchanged; mean IoU drop of the
    clean label (clean IoU − adversarial IoU of the same concept)."""
    adv = adv_iou.detach().double().cpu()
    detectors = [u for u in clean if u.detector]
    if not detectors:
        return {"detectors": 0, "stable_fraction": float("nan"), "mean_iou_drop": float("nan")}
    scored = adv[:, 1:]
    stable = sum(1 for u in detectors if int(torch.argmax(scored[u.index])) + 1 == u.concept_id)
    drop = sum(u.iou - float(adv[u.index, u.concept_id]) for u in detectors) / len(detectors)
    return {"detectors": len(detectors), "stable_fraction": stable / len(detectors), "mean_iou_drop": drop}
