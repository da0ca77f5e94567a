"""Concept masks in the compact form dissection counts with, and the per-chunk label statistics.

A batch's masks (category -> (B, H, W) int64 global concept ids, 0 = none) are stacked once into one pixel-major
(B, H, W, categories present) int16 tensor (int32 past 32767 concepts): a quarter of the bytes for the chunk's
bookkeeping and the activation cache to move, and the IoU reads all categories of a pixel in one row gather (6-9x
faster than one gather per category). Everything the IoU needs from the labels of a chunk of images then
comes from one `bincount` over (image, category, concept): pixel counts per concept, which categories each image
annotates, and which concepts each image contains (for concept-class co-occurrence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from conceptlens.handlers.errors import InvalidInput


@dataclass
class PreparedMasks:
    """The label side of one chunk of images, shared by every layer's IoU accumulator."""

    categories: list[int]  # category index (into the table's categories) of each column of `concepts`
    size: tuple[int, int]  # mask resolution (H, W)
    concepts: torch.Tensor  # (B·H·W, categories present) int16/int32 concept ids, clamped to the table
    annotated: torch.Tensor  # (B, categories present) bool: the image has some label in that category
    label_pixels: torch.Tensor  # (num_concepts,) float64 pixel counts of this chunk, id 0 excluded
    contains: torch.Tensor | None = None  # (B, num_concepts) bool: concept occurs in the image (pass 1 only)

    @property
    def images(self) -> int:
        return int(self.annotated.shape[0])


class MaskTable:
    """The concept table of a dissection: `concept_category[c]` is the index into `categories` of concept id c's
    category (-1 for id 0 and unknown ids, which are never scored)."""

    def __init__(self, concept_category: Sequence[int], categories: Sequence[str]) -> None:
        self.categories = list(categories)
        self.concept_category = torch.as_tensor(list(concept_category), dtype=torch.long)
        self.num_concepts = int(self.concept_category.numel())

    @property
    def dtype(self) -> torch.dtype:
        """The stacked masks' dtype: int16 while every concept id fits (clamping keeps negatives at 0)."""
        return torch.int16 if self.num_concepts <= torch.iinfo(torch.int16).max else torch.int32

    def present(self, masks: Mapping[str, torch.Tensor]) -> list[int]:
        """Indices of the table's categories that `masks` annotates."""
        present = [i for i, cat in enumerate(self.categories) if cat in masks]
        if not present:
            raise InvalidInput("masks", f"none of the categories {self.categories} in {sorted(masks)}")
        return present

    def stack(self, masks: Mapping[str, torch.Tensor], device: torch.device, out: torch.Tensor | None = None,
              clamp: bool = True) -> tuple[list[int], torch.Tensor]:
        """category -> (B, H, W) masks -> (category indices present, (B, H, W, present) ids in `self.dtype`,
        clamped to the table unless `clamp` is False: then call `clamp` on the result before use), written into
        `out` when given (e.g. a slice of a chunk's buffer)."""
        present = self.present(masks)
        first = masks[self.categories[present[0]]]
        if out is None:
            out = torch.empty((*first.shape, len(present)), dtype=self.dtype, device=device)
        for column, i in enumerate(present):
            mask = masks[self.categories[i]]
            if mask.shape != first.shape:
                raise InvalidInput("masks", f"{self.categories[i]} mask has shape {tuple(mask.shape)}, "
                                            f"expected {tuple(first.shape)} like the others")
            out[..., column].copy_(mask)
        return present, self.clamp(out) if clamp else out

    def clamp(self, stacked: torch.Tensor) -> torch.Tensor:
        """Clamp stacked ids in place to the table (an unknown id counts as the last concept, as before)."""
        return stacked.clamp_(0, self.num_concepts - 1)

    def prepare(self, present: list[int], stacked: torch.Tensor, *, contains: bool = False) -> PreparedMasks:
        """Label statistics of stacked masks (B, H, W, present), from one bincount over (image, category, id)."""
        images, rows = stacked.shape[0], stacked.shape[3]
        size = (int(stacked.shape[1]), int(stacked.shape[2]))
        cells = images * rows * self.num_concepts
        dtype = torch.int32 if cells < 2**31 else torch.long
        offset = (torch.arange(images, device=stacked.device, dtype=dtype).view(-1, 1) * rows
                  + torch.arange(rows, device=stacked.device, dtype=dtype).view(1, -1)) * self.num_concepts
        # convert, then add in place: a broadcast add of int16 and int32 into a new tensor is ~4x slower on CPU
        flat = stacked.flatten(1, 2).to(dtype).add_(offset.unsqueeze(1)).flatten()
        counts = torch.bincount(flat, minlength=cells).view(images, rows, self.num_concepts)
        annotated = counts[:, :, 1:].sum(2) > 0
        own = self.concept_category.to(stacked.device).view(1, -1) == torch.tensor(present, device=stacked.device
                                                                                   ).view(-1, 1)
        pixels = (counts.sum(0).double() * own).sum(0)  # a pixel counts only under its concept's own category
        pixels[0] = 0
        found = None
        if contains:
            found = counts.sum(1) > 0
            found[:, 0] = False
        return PreparedMasks(present, size, stacked.flatten(0, 2), annotated, pixels, found)

    def prepare_masks(self, masks: Mapping[str, torch.Tensor], device: torch.device) -> PreparedMasks:
        present, stacked = self.stack(masks, device)
        return self.prepare(present, stacked)
