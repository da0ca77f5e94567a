"""IoU between thresholded unit maps and concept masks, summed over a dataset, batched on the data's device.

For unit k and concept c (docs/design.md §5.4): M_k(x) = bilinear_upsample(A_k(x)) > T_k at the mask resolution
(the engine's `mask_size`, 112 px a side at most by default) and
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

import torch
import torch.nn.functional as F

from conceptlens.handlers.errors import InvalidInput

from .masks import MaskTable, PreparedMasks

_CHUNK_ELEMENTS = 1 << 22  # interpolated block pixels held at once: ~16 MB in float32
_BLOCKS_AT_ONCE = 1 << 20  # hot blocks screened at once (corners and indices: ~60 MB)


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


@functools.lru_cache(maxsize=32)
def _block_ends(n_in: int, n_out: int, device: str) -> torch.Tensor:
    """(2, n_in + 1): λ of the first and the last position of each block of `_blocks` (λ ascends in a block)."""
    lams = _blocks(n_in, n_out, device)[1]
    last = (~lams.isnan()).sum(1) - 1
    return torch.stack([lams[:, 0], lams.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)])


@functools.lru_cache(maxsize=32)
def _blocks_last(n_in: int, n_out: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`_blocks` transposed: positions and λ as (S, n_in + 1), so gathered per-block columns sit last."""
    positions, lams = _blocks(n_in, n_out, device)
    return positions.t().contiguous(), lams.t().contiguous()


def _interpolate(corners: torch.Tensor, lam_y: torch.Tensor, lam_x: torch.Tensor) -> torch.Tensor:
    """Blocks interpolated as PyTorch's bilinear kernel does (along x first): corners (4, n) as c00, c01, c10,
    c11; λ_y (Sy, n), λ_x (Sx, n) -> (Sy, Sx, n). Blocks sit in the last dimension: broadcasting over a long
    contiguous one is much faster per op on CPU than over (n, Sy, Sx)'s short ones (bench/README.md)."""
    top = corners[0] * (1 - lam_x) + corners[1] * lam_x
    bottom = corners[2] * (1 - lam_x) + corners[3] * lam_x
    return top.unsqueeze(0) * (1 - lam_y).unsqueeze(1) + bottom.unsqueeze(0) * lam_y.unsqueeze(1)


def _corner_max(maps: torch.Tensor) -> torch.Tensor:
    """(n, h, w) -> (n, h+1, w+1): the largest of the 2x2 cells each block of `_blocks` reads (the map padded by
    one replicated cell), from shifted maxima, which is faster on CPU than padding and taking four shifted views."""
    rows = torch.cat([maps[:, :1], torch.maximum(maps[:, :-1], maps[:, 1:]), maps[:, -1:]], 1)
    return torch.cat([rows[:, :, :1], torch.maximum(rows[:, :, :-1], rows[:, :, 1:]), rows[:, :, -1:]], 2)


def upsample(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (..., h, w) maps to (..., H, W), as F.interpolate computes it.

    Bilinear interpolation is separable, so it is two small matrix products, Wy · A · Wxᵀ: faster on CPU than
    `upsample_bilinear2d` for dissection's many small maps (bench/README.md), equal to it within float rounding.
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


class IoUAccumulator:
    """Accumulate intersection and union counts of `units` thresholded maps against `num_concepts` concepts.

    `concept_category[c]` is the index (into `categories`) of concept id c's category; id 0 means "none" and is
    never scored. Call `update(acts, masks)` per batch and `iou()` at the end: (units, num_concepts) float64.
    """

    def __init__(self, thresholds: torch.Tensor, concept_category: Sequence[int], categories: Sequence[str]) -> None:
        self.thresholds = thresholds.detach().float()
        self.units = int(thresholds.numel())
        self.table = MaskTable(concept_category, categories)
        self.categories = self.table.categories
        device = self.thresholds.device
        self.concept_category = self.table.concept_category.to(device)
        self.num_concepts = self.table.num_concepts
        self.intersection = torch.zeros(self.units, self.num_concepts, dtype=torch.float64, device=device)
        self.label_pixels = torch.zeros(self.num_concepts, dtype=torch.float64, device=device)
        self.mask_pixels = torch.zeros(self.units, len(self.categories), dtype=torch.float64, device=device)
        self.images = 0

    def update(self, acts: torch.Tensor, masks: Mapping[str, torch.Tensor] | PreparedMasks) -> None:
        """acts (B,K,h,w) on any device; masks: category -> (B,H,W) int64 global concept ids (0 = none), or the
        same already prepared by a `MaskTable` (one preparation shared by every layer).

        Sparse and exact. Bilinear upsampling makes each output pixel a convex combination of the 2x2 source
        cells of its block (`_blocks`), so a pixel can exceed T_k only inside a block whose largest corner does.
        Only those blocks are interpolated, with F.interpolate's weights, and only their True pixels are
        counted (one bincount over all categories): the cost follows the few hot blocks of the ~q share of
        active maps instead of units × pixels (a 7x7 map upsampled to 112 px has 64 blocks of 16x16 pixels).
        Maps, blocks and corners are addressed by flat index, so a chunk costs a fixed few dozen ops.
        """
        if acts.dim() != 4 or acts.shape[1] != self.units:
            raise InvalidInput("acts", f"expected (B, {self.units}, h, w), got {tuple(acts.shape)}")
        active = (acts.amax((2, 3)) > self.thresholds.view(1, -1)).flatten().nonzero().squeeze(1)  # b·K + k
        self.update_maps(acts.flatten(0, 1).index_select(0, active), active, masks, acts.shape[0])

    def update_maps(self, maps: torch.Tensor, index: torch.Tensor, masks: Mapping[str, torch.Tensor] | PreparedMasks,
                    images: int) -> None:
        """`update` given only some maps of a (B, K, h, w) batch of `images`: maps (n, h, w) with their flat
        indices b·K + k. Every map left out must stay at or below T_k (e.g. its maximum is at most a lower bound
        of T_k), as those contribute nothing; pass 1 caches only such candidate maps (`engine`)."""
        device = maps.device
        prepared = masks if isinstance(masks, PreparedMasks) else self.table.prepare_masks(masks, device)
        if prepared.images != images:
            raise InvalidInput("masks", f"masks for {prepared.images} images, activations for {images}")
        self.label_pixels += prepared.label_pixels
        self.images += images
        (height, width), (h, w) = prepared.size, maps.shape[1:]
        index = index.long()
        active = (maps.flatten(1).amax(1) > self.thresholds.index_select(0, index % self.units)).nonzero().squeeze(1)
        if active.numel() == 0:
            return
        index = index.index_select(0, active)
        k_map, b_map = index % self.units, index // self.units
        hot_maps = maps.index_select(0, active).float()  # (n, h, w)
        t_map = self.thresholds.index_select(0, k_map)
        hot = (_corner_max(hot_maps) > t_map.view(-1, 1, 1)).flatten().nonzero().squeeze(1)  # map·blocks + block
        ends_y, ends_x = _block_ends(h, height, str(device)), _block_ends(w, width, str(device))
        blocks = (h + 1) * (w + 1)
        per_map = torch.zeros(active.numel(), dtype=torch.float64, device=device)
        for start in range(0, hot.numel(), _BLOCKS_AT_ONCE):
            part = hot[start : start + _BLOCKS_AT_ONCE]
            m, q = part // blocks, part % blocks
            qy, qx = q // (w + 1), q % (w + 1)
            # block (qy, qx) reads source cells qy - 1 and qy (rows), qx - 1 and qx (columns), clamped
            y0, y1 = (qy - 1).clamp_(min=0) * w, qy.clamp(max=h - 1) * w
            x0, x1 = (qx - 1).clamp_(min=0), qx.clamp(max=w - 1)
            base = m * (h * w)
            c = hot_maps.view(-1).take(torch.stack([base + y0 + x0, base + y0 + x1, base + y1 + x0, base + y1 + x1]))
            t = t_map.index_select(0, m)
            # Bilinear interpolation is affine along each axis, so a block's largest pixel is one of its four
            # extreme pixels. Many blocks with a corner above T_k have no pixel above it (61% and 36% on
            # small_cnn's two layers, and this skips all of them): skip those whose extreme pixels stay below
            # T_k by a margin ~100x float rounding, so nothing the exact comparison below would count is skipped.
            peak = _interpolate(c, ends_y.index_select(1, qy), ends_x.index_select(1, qx)).flatten(0, 1).amax(0)
            keep = (peak > t - 1e-5 * c.abs().amax(0)).nonzero().squeeze(1)
            m, qy, qx, t = (v.index_select(0, keep) for v in (m, qy, qx, t))
            c = c.index_select(1, keep)
            self._count_blocks(m, qy, qx, c, t, (b_map, k_map, h, w), per_map, prepared)
        # |M_k(x)| per unit and image, then summed over the images that annotate each category
        per_image = torch.bincount(k_map * images + b_map, weights=per_map, minlength=self.units * images)
        per_unit = per_image.view(self.units, images) @ prepared.annotated.double()
        self.mask_pixels[:, torch.tensor(prepared.categories, device=device)] += per_unit

    def _count_blocks(self, m: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                      maps: tuple[torch.Tensor, torch.Tensor, int, int], per_map: torch.Tensor,
                      prepared: PreparedMasks) -> None:
        """Interpolate blocks (map m, block row qy and column qx, corners c (4, n), threshold t) pixel by pixel as
        F.interpolate does and count their True pixels into the intersection and into per_map (|M_k(x)|).
        `maps` holds each map's image and unit and the maps' size (h, w)."""
        device = c.device
        b_map, k_map, h, w = maps
        height, width = prepared.size
        rows, lam_y = _blocks_last(h, height, str(device))
        cols, lam_x = _blocks_last(w, width, str(device))
        # a block's pixels are contiguous in y and in x: pixel = the block's first pixel + a fixed offset
        offsets = (torch.arange(rows.shape[0], device=device).unsqueeze(1) * width
                   + torch.arange(cols.shape[0], device=device)).flatten()  # (Sy·Sx,)
        step = max(1, _CHUNK_ELEMENTS // offsets.numel())
        for start in range(0, m.numel(), step):
            part = slice(start, start + step)
            mp, yp, xp = m[part], qy[part], qx[part]
            over = _interpolate(c[:, part], lam_y.index_select(1, yp), lam_x.index_select(1, xp)) > t[part]
            slot, sel = over.flatten(0, 1).nonzero(as_tuple=True)  # (Sy·Sx, n): slot in the block, block
            if sel.numel() == 0:
                continue
            per_map.index_add_(0, mp, over.sum((0, 1), dtype=torch.int32).double())  # |M_k(x)| in parts
            first = ((b_map.index_select(0, mp) * height + rows[0].index_select(0, yp)) * width
                     + cols[0].index_select(0, xp))
            pixel = first.index_select(0, sel) + offsets.index_select(0, slot)
            unit = (k_map.index_select(0, mp) * self.num_concepts).index_select(0, sel)
            cells = prepared.concepts.index_select(0, pixel).long().add_(unit.unsqueeze(1)).flatten()  # (unit, concept)
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
