"""From an IoU matrix to unit labels (docs/design.md §5): best concept per category and overall, detector flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

DETECTOR_IOU = 0.04


@dataclass(frozen=True)
class Concept:
    id: int
    name: str
    category: str


@dataclass
class UnitLabel:
    """One unit's dissection: best concept overall, best per category, and whether it is a detector."""

    index: int
    label: str
    category: str
    iou: float
    detector: bool
    concept_id: int
    by_category: dict[str, dict[str, float | str]] = field(default_factory=dict)


def concept_table(concepts: Sequence[Concept], num_ids: int | None = None) -> tuple[list[str], list[int]]:
    """(categories in first-seen order, category index per concept id with -1 for id 0 and unknown ids)."""
    categories: list[str] = []
    for c in concepts:
        if c.category not in categories:
            categories.append(c.category)
    size = max([c.id for c in concepts] + [0]) + 1 if num_ids is None else num_ids
    of = [-1] * size
    for c in concepts:
        if c.id > 0:
            of[c.id] = categories.index(c.category)
    return categories, of


def label_units(iou: torch.Tensor, concepts: Sequence[Concept], threshold: float = DETECTOR_IOU) -> list[UnitLabel]:
    """Label every row of `iou` (units, concept ids): argmax overall and per category; detector if IoU ≥ threshold."""
    by_id = {c.id: c for c in concepts if c.id > 0}
    iou = iou.detach().double().cpu()
    categories = list(dict.fromkeys(c.category for c in concepts))
    cat_ids = {cat: torch.tensor([c.id for c in concepts if c.category == cat and c.id > 0], dtype=torch.long)
               for cat in categories}
    scored = torch.tensor(sorted(by_id), dtype=torch.long)
    # argmaxes for all units at once; the loop below only formats (a tensor op per unit and category took
    # 30 ms for resnet18's 512 units)
    best = (scored[iou[:, scored].argmax(1)] if len(scored) else torch.zeros(iou.shape[0], dtype=torch.long)).tolist()
    value = iou.gather(1, torch.tensor(best).view(-1, 1)).squeeze(1).tolist()
    per_cat_best = {}
    for cat, ids in cat_ids.items():
        if len(ids):
            j = ids[iou[:, ids].argmax(1)]
            per_cat_best[cat] = (j.tolist(), iou.gather(1, j.view(-1, 1)).squeeze(1).tolist())
    out = []
    for k in range(iou.shape[0]):
        v = value[k] if best[k] else 0.0
        per_cat: dict[str, dict[str, float | str]] = {
            cat: {"label": by_id[ids[k]].name, "iou": vals[k]} for cat, (ids, vals) in per_cat_best.items()}
        concept = by_id.get(best[k])
        out.append(UnitLabel(
            index=k,
            label=concept.name if concept and v > 0 else "",
            category=concept.category if concept and v > 0 else "",
            iou=v,
            detector=v >= threshold,
            concept_id=best[k] if v > 0 else 0,
            by_category=per_cat,
        ))
    return out


def unique_detectors(labels: Sequence[UnitLabel]) -> dict[str, int]:
    """Layer interpretability: unique concepts among detectors, per category and in total ("all")."""
    seen: dict[str, set[str]] = {}
    for u in labels:
        if u.detector:
            seen.setdefault(u.category, set()).add(u.label)
    counts = {cat: len(names) for cat, names in seen.items()}
    counts["all"] = sum(counts.values())
    return counts


def detectors_by_category(labels: Sequence[UnitLabel]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for u in labels:
        if u.detector:
            counts[u.category] = counts.get(u.category, 0) + 1
    return counts
