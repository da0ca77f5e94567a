"""IoU between thresholded unit maps and concept masks, summed over a dataset, batched on the data's device.

For unit k and concept c (design.md §5): M_k(x) = bilinear_upsample(A_k(x)) > T_k at the mask resolution and
IoU_{k,c} = Σ_x |M_k(x) ∩ L_c(x)| / Σ_x |M_k(x) ∪ L_c(x)|. As in NetDissect, an image counts towards a concept's
union only if its category is annotated in that image (any non-zero pixel in the category's mask): a scene label
missing from half of Broden must not count as a miss there. On ShapesWorld every category is annotated in every
image, so this is exactly the formula above. Counts are accumulated in float64 so they stay exact; see
`IoUAccumulator.update` for why only the 2x2-cell blocks of a map whose largest corner exceeds T_k are
interpolated (`upsample` is the dense equivalent, used for report figures).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conceptlens.handlers.errors import InvalidInput

_CHUNK_ELEMENTS = 1 << 22  # interpolated block pixels held at once: ~16 MB in float32


@functools.lru_cache(maxsize=32)
def _linear_weights(n_in: int, n_out: int, device: str) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation, align_corners=False: row j holds output j's weights."""
    eye = torch.eye(n_in, device=device).unsqueeze(0)  # each input position as a unit impulse
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t().contiguous()


@functools.lru_cache(maxsize=32)
def _blocks(n_in: int, n_out: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D bilinear interpolation (align_corners=False) grouped into blocks of output positions that read the same
    two cells of the source padded by one replicated cell at each end: block q reads padded cells q and q + 1,
    i.e. source cells q - 1 and q, clamped. Position j of block q gets (1 - λ_j)·cell q + λ_j·cell q+1.
    Returns the positions (n_in + 1, S) and λ (n_in + 1, S), S the largest block (≈ the scale); padding slots
    have λ = NaN, so whatever they interpolate to compares False against a threshold."""
    weights = _linear_weights(n_in, n_out, device)  # (n_out, n_in): F.interpolate's own weights
    first = (weights > 0).float().argmax(1)  # the lower source cell each position reads
    second = torch.clamp(first + 1, max=n_in - 1)
    lam = torch.where(second > first, weights.gather(1, second.unsqueeze(1)).squeeze(1), torch.zeros(n_out,
                                                                                                     device=device))
    index = torch.arange(n_out, device=device)
    edge = (first == 0) & (lam == 0) & (index < n_out / 2)  # clamped at the top: read cell 0 only
    block = torch.where(edge, torch.zeros_like(first), first + 1)
    size = int(torch.bincount(block, minlength=n_in + 1).max())
    positions = torch.zeros((n_in + 1, size), dtype=torch.long, device=device)
    lams = torch.full((n_in + 1, size), float("nan"), device=device)  # padding: NaN is never > T_k
    slot = index - torch.searchsorted(block, block)  # place within its block (blocks ascend with j)
    positions[block, slot] = index
    lams[block, slot] = lam
    return positions, lams


def upsample(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (..., h, w) maps to (..., H, W), as F.interpolate computes it.

    Bilinear interpolation is separable, so it is two small matrix products, Wy · A · Wxᵀ: about 5x faster on
    CPU than `upsample_bilinear2d` for dissection's many small maps; equal to it within float rounding (~5e-7).
    """
    wy = _linear_weights(acts.shape[-2], size[0], str(acts.device))
    wx = _linear_weights(acts.shape[-1], size[1], str(acts.device))
    return wy @ acts.float() @ wx.t()


def unit_masks(acts: torch.Tensor, size: tuple[int, int], thresholds: torch.Tensor) -> torch.Tensor:
    """M_k = upsample(A_k) > T_k: acts (B,K,h,w), thresholds (K,) -> bool (B,K,H,W).

    With K = 1 (one map per row) `thresholds` may instead hold one threshold per row: shape (B,).
    """
    up = upsample(acts, size)
    t = thresholds.to(up.device)
    t = t.view(-1, 1, 1, 1) if acts.shape[1] == 1 and t.numel() == acts.shape[0] else t.view(1, -1, 1, 1)
    return up > t


@dataclass
class PreparedMasks:
    labels: dict[str, torch.Tensor]  # category -> (B,H,W) on the activations' device
    annotated: torch.Tensor  # (B, categories present) bool
    label_pixels: torch.Tensor  # (num_concepts,) float64 pixel counts of this batch
    concepts: torch.Tensor  # (categories present, B·H·W) concept ids, clamped to the table


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
        self.intersection = torch.zeros(self.units, self.num_concepts, dtype=torch.float64, device=device)
        self.label_pixels = torch.zeros(self.num_concepts, dtype=torch.float64, device=device)
        self.mask_pixels = torch.zeros(self.units, len(self.categories), dtype=torch.float64, device=device)
        self.images = 0

    def prepare(self, masks: Mapping[str, torch.Tensor], device: torch.device) -> PreparedMasks:
        """Per-batch label statistics, computed once and shared by every layer's accumulator."""
        present = [cat for cat in self.categories if cat in masks]
        labels = {cat: masks[cat].to(device) for cat in present}
        annotated = torch.stack([(labels[cat] != 0).flatten(1).any(1) for cat in present], 1)  # (B, cats)
        pixels = torch.zeros(self.num_concepts, dtype=torch.float64, device=device)
        for cat in present:
            ids = labels[cat].flatten().clamp(0, self.num_concepts - 1)
            counts = torch.bincount(ids, minlength=self.num_concepts)[: self.num_concepts].double()
            pixels += counts * (self.concept_category == self.categories.index(cat)).double()
        pixels[0] = 0
        concepts = torch.stack([labels[cat].flatten() for cat in present]).clamp_(0, self.num_concepts - 1)
        return PreparedMasks(labels, annotated, pixels, concepts)

    def update(
        self, acts: torch.Tensor, masks: Mapping[str, torch.Tensor], prepared: PreparedMasks | None = None
    ) -> None:
        """acts (B,K,h,w) on any device; masks: category -> (B,H,W) int64 global concept ids (0 = none).

        Sparse and exact. Bilinear upsampling makes each output pixel a convex combination of the 2x2 source
        cells of its block (`_blocks`), so a pixel can exceed T_k only inside a block whose largest corner does.
        Only those blocks are interpolated, with F.interpolate's weights, and only their True pixels are
        counted (one bincount over all categories): the cost follows the few hot blocks of the ~q share of
        active maps instead of units × pixels (a 7x7 map upsampled to 112 px has 64 blocks of 16x16 pixels).
        """
        if acts.dim() != 4 or acts.shape[1] != self.units:
            raise InvalidInput("acts", f"expected (B, {self.units}, h, w), got {tuple(acts.shape)}")
        present = [cat for cat in self.categories if cat in masks]
        if not present:
            raise InvalidInput("masks", f"none of the categories {self.categories} in {sorted(masks)}")
        device = acts.device
        prepared = prepared or self.prepare(masks, device)
        labels, annotated = prepared.labels, prepared.annotated
        size = tuple(labels[present[0]].shape[-2:])
        self.label_pixels += prepared.label_pixels
        cat_cols = torch.tensor([self.categories.index(cat) for cat in present], device=device)
        self.images += acts.shape[0]
        b_act, k_act = (acts.amax((2, 3)) > self.thresholds.view(1, -1)).nonzero().unbind(1)  # active maps
        if b_act.numel() == 0:
            return
        rows, lam_y = _blocks(acts.shape[2], size[0], str(device))
        cols, lam_x = _blocks(acts.shape[3], size[1], str(device))
        padded = F.pad(acts[b_act, k_act].float().unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
        corner_max = torch.maximum(torch.maximum(padded[:, :-1, :-1], padded[:, :-1, 1:]),
                                   torch.maximum(padded[:, 1:, :-1], padded[:, 1:, 1:]))  # (n, h+1, w+1)
        t_act = self.thresholds[k_act]
        hot = (corner_max > t_act.view(-1, 1, 1)).nonzero()  # (blocks, 3): map, block row, block column
        # a block's pixels are contiguous in y and in x: pixel = the block's first pixel + a fixed offset
        offsets = (torch.arange(rows.shape[1], device=device).unsqueeze(1) * size[1]
                   + torch.arange(cols.shape[1], device=device)).flatten()  # (Sy·Sx,)
        unit_cells = k_act * self.num_concepts
        step = max(1, _CHUNK_ELEMENTS // offsets.numel())
        for start in range(0, hot.shape[0], step):
            m, qy, qx = hot[start : start + step].unbind(1)
            c00, c01 = padded[m, qy, qx], padded[m, qy, qx + 1]
            c10, c11 = padded[m, qy + 1, qx], padded[m, qy + 1, qx + 1]
            ly, lx = lam_y[qy].unsqueeze(2), lam_x[qx]  # (n,Sy,1), (n,Sx)
            top = c00.unsqueeze(1) * (1 - lx) + c01.unsqueeze(1) * lx  # along x first, as PyTorch does
            bottom = c10.unsqueeze(1) * (1 - lx) + c11.unsqueeze(1) * lx
            values = top.unsqueeze(1) * (1 - ly) + bottom.unsqueeze(1) * ly  # (n,Sy,Sx)
            sel, slot = (values > t_act[m].view(-1, 1, 1)).flatten(1).nonzero(as_tuple=True)
            if sel.numel() == 0:
                continue
            per_block = torch.bincount(sel, minlength=len(m)).double()  # True pixels: |M_k(x)| in parts
            per_unit = torch.zeros(self.units, len(present), dtype=torch.float64, device=device)
            self.mask_pixels[:, cat_cols] += per_unit.index_add_(0, k_act[m],
                                                                 per_block.unsqueeze(1) * annotated[b_act[m]])
            first = (b_act[m] * size[0] + rows[qy, 0]) * size[1] + cols[qx, 0]
            pixel = first[sel] + offsets[slot]
            cells = (prepared.concepts[:, pixel] + unit_cells[m][sel]).flatten()  # (unit, concept) per True pixel
            self.intersection += torch.bincount(cells, minlength=self.intersection.numel()).view_as(
                self.intersection)

    def union(self) -> torch.Tensor:
        cat_of = self.concept_category.clamp(min=0)
        return self.mask_pixels[:, cat_of] + self.label_pixels.unsqueeze(0) - self.intersection

    def iou(self) -> torch.Tensor:
        """(units, num_concepts) IoU; 0 where the union is empty and for concept id 0."""
        union = self.union()
        out = torch.where(union > 0, self.intersection / union.clamp(min=1), torch.zeros_like(union))
        out[:, 0] = 0
        return out
