"""The dissection's unit of bookkeeping: a chunk of consecutive images, several forward batches wide.

The model runs at the configured batch size, but thresholds, IoU, pools and histograms are updated once per
chunk: a fixed memory budget (`DissectConfig.chunk_bytes`) of activations and compact masks. Each update costs a
few dozen tensor ops whatever its size, so on a small model (a 32 px ShapesWorld CNN, 0.25 ms per image) batch-
sized updates cost as much as the forward pass itself; chunk-sized ones amortise that. A chunk holds at most the
budget (or one batch, if a batch is bigger), so memory stays independent of the number of images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.hooks import capture
from conceptlens.handlers.zoo import ImageClassifier

from .masks import MaskTable, PreparedMasks


@dataclass
class Chunk:
    start: int  # dataset index of its first image
    masks: PreparedMasks
    labels: torch.Tensor | None  # (B,) class indices on the device; None when the data has no classes
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, K, h, w), when the model ran
    images: torch.Tensor | None = None  # (B, 3, H, W), only when asked for (attacks need them)

    @property
    def size(self) -> int:
        return self.masks.images

    def record(self) -> dict[str, torch.Tensor]:
        """Everything pass 2 needs except the images, as named tensors for `ChunkCache`."""
        m = self.masks
        out = {"concepts": m.concepts, "annotated": m.annotated, "label_pixels": m.label_pixels,
               "categories": torch.tensor(m.categories), "size": torch.tensor(m.size)}
        if self.labels is not None:
            out["labels"] = self.labels
        out.update({f"act:{name}": a for name, a in self.acts.items()})
        return out

    @staticmethod
    def from_record(start: int, record: Mapping[str, torch.Tensor]) -> Chunk:
        size = tuple(int(v) for v in record["size"])
        masks = PreparedMasks([int(v) for v in record["categories"]], (size[0], size[1]), record["concepts"],
                              record["annotated"], record["label_pixels"])
        acts = {name[4:]: t for name, t in record.items() if name.startswith("act:")}
        return Chunk(start, masks, record.get("labels"), acts)


def unpack(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A collated concept batch in either item order -> (images, class labels or None, masks)."""
    images = next(x for x in batch if torch.is_tensor(x) and x.dim() == 4)
    masks = next((x for x in batch if isinstance(x, Mapping)), None)
    if masks is None:
        raise InvalidInput("data", "items carry no concept masks (a dict category -> mask)")
    labels = next((x for x in batch if torch.is_tensor(x) and x.dim() == 1), None)
    if labels is not None and bool((labels < 0).any()):
        labels = None  # Broden without classes.json: -1
    return images, labels, dict(masks)


def forward(model: ImageClassifier, layers: Sequence[str], images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and the detached activations of `layers`, without gradients."""
    with torch.no_grad(), capture(model, layers, detach=True) as acts:
        logits = model(images)
        return logits, dict(acts)


class ChunkStream:
    """Reads a concept dataset in forward batches and yields chunks. The first pass over the data fixes the chunk
    size in images (from the first batch's bytes), so every later pass, and the cache, chunk the same way."""

    def __init__(self, dataset: Dataset, table: MaskTable, device: torch.device, *, batch_size: int,
                 chunk_bytes: int, num_workers: int = 0, max_images: int | None = None) -> None:
        n = len(dataset) if max_images is None else min(len(dataset), max_images)
        self.dataset = dataset if n == len(dataset) else Subset(dataset, range(n))
        self.images = n
        self.table, self.device = table, device
        self.batch_size, self.chunk_bytes, self.num_workers = batch_size, chunk_bytes, num_workers
        self.chunk_images: int | None = None

    def __call__(self, desc: str, model: ImageClassifier | None = None, layers: Sequence[str] = (),
                 *, keep_images: bool = False, contains: bool = False) -> Iterator[Chunk]:
        """Chunks in dataset order; with `model`, each carries the activations of `layers`."""
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        parts: list[tuple[torch.Tensor | None, torch.Tensor | None, dict, torch.Tensor]] = []
        present: list[int] = []
        start = held = 0
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            images, labels, masks = unpack(batch)
            images = images.to(self.device)
            acts = forward(model, layers, images)[1] if model is not None else {}
            now_present, stacked = self.table.stack(masks, self.device)
            if parts and now_present != present:  # a chunk's masks stack into one tensor: same categories
                yield self._merge(start, parts, present, contains)
                start, held, parts = start + held, 0, []
            present = now_present
            parts.append((images if keep_images else None, None if labels is None else labels.to(self.device),
                          acts, stacked))
            held += images.shape[0]
            if self.chunk_images is None:
                self.chunk_images = self._chunk_images(images.shape[0], acts, stacked)
            if held >= self.chunk_images:
                yield self._merge(start, parts, present, contains)
                start, held, parts = start + held, 0, []
        if parts:
            yield self._merge(start, parts, present, contains)

    def _chunk_images(self, batch: int, acts: Mapping[str, torch.Tensor], stacked: torch.Tensor) -> int:
        per_image = (sum(a.numel() * a.element_size() for a in acts.values())
                     + stacked.numel() * stacked.element_size()) / batch
        whole_batches = int(self.chunk_bytes // max(1.0, per_image)) // self.batch_size
        return max(1, whole_batches) * self.batch_size

    def _merge(self, start: int, parts: list, present: list[int], contains: bool) -> Chunk:
        def cat(items: list, dim: int = 0) -> torch.Tensor:
            return items[0] if len(items) == 1 else torch.cat(items, dim)

        images = cat([p[0] for p in parts]) if parts[0][0] is not None else None
        labels = cat([p[1] for p in parts]) if all(p[1] is not None for p in parts) else None
        acts = {name: cat([p[2][name] for p in parts]) for name in parts[0][2]}
        masks = self.table.prepare(present, cat([p[3] for p in parts], 1), contains=contains)
        return Chunk(start, masks, labels, acts, images)
