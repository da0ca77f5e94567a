"""IoU between thresholded unit maps and concept masks, summed over a dataset, batched on the data's device.

For unit k and concept c (design.md §5): M_k(x) = bilinear_upsample(A_k(x)) > T_k at the mask resolution and
IoU_{k,c} = Σ_x |M_k(x) ∩ L_c(x)| / Σ_x |M_k(x) ∪ L_c(x)|. As in NetDissect, an image counts towards a concept's
union only if its category is annotated in that image (any non-zero pixel in the category's mask): a scene label
missing from half of Broden must not count as a miss there. On ShapesWorld every category is annotated in every
image, so this is exactly the formula above. Intersections are one matmul per category:
(units × pixels) @ (pixels × concepts of the category), accumulated in float64 so counts stay exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from conceptlens.handlers.errors import InvalidInput

_CHUNK_ELEMENTS = 1 << 22  # upsampled unit maps held at once (units × images × pixels): ~16 MB in float32


def unit_masks(acts: torch.Tensor, size: tuple[int, int], thresholds: torch.Tensor) -> torch.Tensor:
    """M_k = upsample(A_k) > T_k: acts (B,K,h,w), thresholds (K,) -> bool (B,K,H,W)."""
    up = F.interpolate(acts.float(), size=size, mode="bilinear", align_corners=False)
    return up > thresholds.to(up.device).view(1, -1, 1, 1)


class IoUAccumulator:
    """Accumulate intersection and union counts of `units` thresholded maps against `num_concepts` concepts.

    `concept_category[c]` is the index (into `categories`) of concept id c's category; id 0 means "none" and is
    never scored. Call `update(acts, masks)` per batch and `iou()` at the end: (units, num_concepts) float64.
    """

    def __init__(self, thresholds: torch.Tensor, concept_category: Sequence[int], categories: Sequence[str]) -> None:
        self.thresholds = thresholds.detach().float()
        self.units = int(thresholds.numel())
        self.categories = list(categories)
        device = self.thresholds.device
        self.concept_category = torch.as_tensor(list(concept_category), dtype=torch.long, device=device)
        self.num_concepts = int(self.concept_category.numel())
        # Per category: the global ids that belong to it, and a lookup global id -> local column (-1 elsewhere).
        self._ids: dict[str, torch.Tensor] = {}
        self._local: dict[str, torch.Tensor] = {}
        for i, cat in enumerate(self.categories):
            ids = torch.nonzero(self.concept_category == i).flatten()
            ids = ids[ids != 0]
            local = torch.zeros(self.num_concepts, dtype=torch.long, device=device)  # 0 = not in this category
            local[ids] = torch.arange(1, len(ids) + 1, device=device)
            self._ids[cat], self._local[cat] = ids, local
        self.intersection = torch.zeros(self.units, self.num_concepts, dtype=torch.float64, device=device)
        self.label_pixels = torch.zeros(self.num_concepts, dtype=torch.float64, device=device)
        self.mask_pixels = torch.zeros(self.units, len(self.categories), dtype=torch.float64, device=device)
        self.images = 0

    def update(self, acts: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> None:
        """acts (B,K,h,w) on any device; masks: category -> (B,H,W) int64 global concept ids (0 = none)."""
        if acts.dim() != 4 or acts.shape[1] != self.units:
            raise InvalidInput("acts", f"expected (B, {self.units}, h, w), got {tuple(acts.shape)}")
        present = [cat for cat in self.categories if cat in masks]
        if not present:
            raise InvalidInput("masks", f"none of the categories {self.categories} in {sorted(masks)}")
        size = tuple(masks[present[0]].shape[-2:])
        batch, pixels = acts.shape[0], size[0] * size[1]
        step = max(1, _CHUNK_ELEMENTS // max(1, self.units * pixels))
        for start in range(0, batch, step):
            sl = slice(start, start + step)
            m = unit_masks(acts[sl], size, self.thresholds)  # (b,K,H,W) bool
            b = m.shape[0]
            flat = m.permute(1, 0, 2, 3).reshape(self.units, b * pixels).float()
            per_image = m.flatten(2).sum(2).double()  # (b,K) mask pixels per image
            for cat in present:
                self._update_category(cat, flat, per_image, masks[cat][sl].to(acts.device))
        self.images += batch

    def _update_category(self, cat: str, flat: torch.Tensor, per_image: torch.Tensor, labels: torch.Tensor) -> None:
        ids = self._ids[cat]
        annotated = (labels != 0).flatten(1).any(1)  # (b,)
        ci = self.categories.index(cat)
        self.mask_pixels[:, ci] += (per_image * annotated.unsqueeze(1)).sum(0)
        if len(ids) == 0:
            return
        local = self._local[cat][labels.clamp(0, self.num_concepts - 1).flatten()]  # (b·P,) local ids, 0 = other
        onehot = F.one_hot(local, len(ids) + 1)[:, 1:].float()  # (b·P, C_cat)
        self.intersection[:, ids] += (flat @ onehot).double()
        self.label_pixels[ids] += onehot.sum(0).double()

    def union(self) -> torch.Tensor:
        cat_of = self.concept_category.clamp(min=0)
        return self.mask_pixels[:, cat_of] + self.label_pixels.unsqueeze(0) - self.intersection

    def iou(self) -> torch.Tensor:
        """(units, num_concepts) IoU; 0 where the union is empty and for concept id 0."""
        union = self.union()
        out = torch.where(union > 0, self.intersection / union.clamp(min=1), torch.zeros_like(union))
        out[:, 0] = 0
        return out
