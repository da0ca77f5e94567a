"""The dissection's unit of bookkeeping: a chunk of consecutive images, several forward batches wide.

The model runs at the configured batch size, but thresholds, IoU, pools and histograms are updated once per
chunk: a fixed memory budget (`DissectConfig.chunk_bytes`) of activations and compact masks. Each update costs a
few dozen tensor ops whatever its size, so on a small model (a 32 px ShapesWorld CNN) batch-sized updates cost
as much as the forward pass itself; chunk-sized ones amortise that (bench/README.md). A chunk holds at most the
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
    candidates: dict[str, Candidates] = field(default_factory=dict)  # what the cache keeps instead of `acts`

    @property
    def size(self) -> int:
        return self.masks.images

    def record(self, candidates: Mapping[str, Candidates]) -> dict[str, torch.Tensor]:
        """The labels and `candidates` as named tensors for `ChunkCache`: what pass 2 needs without the model."""
        m = self.masks
        out = {"concepts": m.concepts, "annotated": m.annotated, "label_pixels": m.label_pixels,
               "categories": torch.tensor(m.categories), "size": torch.tensor(m.size)}
        if self.labels is not None:
            out["labels"] = self.labels
        for name, c in candidates.items():
            out.update({f"maps:{name}": c.maps, f"index:{name}": c.index, f"gap:{name}": c.gap})
        return out

    @staticmethod
    def from_record(start: int, record: Mapping[str, torch.Tensor]) -> Chunk:
        size = tuple(int(v) for v in record["size"])
        masks = PreparedMasks([int(v) for v in record["categories"]], (size[0], size[1]), record["concepts"],
                              record["annotated"], record["label_pixels"])
        names = [key[5:] for key in record if key.startswith("maps:")]
        candidates = {n: Candidates(record[f"maps:{n}"], record[f"index:{n}"], record[f"gap:{n}"]) for n in names}
        return Chunk(start, masks, record.get("labels"), candidates=candidates)


@dataclass
class Candidates:
    """The maps of one layer that may exceed T_k, as pass 1 caches them: maps whose maximum tops a lower bound
    of T_k (the tail sketch's bound). Pass 2's IoU needs no others, and MIS only the GAP of all."""

    maps: torch.Tensor  # (n, h, w)
    index: torch.Tensor  # (n,) int32 flat b·K + k of each map in its chunk
    gap: torch.Tensor  # (B, K) global average pooling of every map


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


def mask_resolution(masks: Mapping[str, torch.Tensor], longest: int | None) -> dict[str, torch.Tensor]:
    """Masks (B, H, W) whose longer side exceeds `longest`, subsampled by nearest neighbour (F.interpolate's
    'nearest' source pixel, floor(i·H/h)) to that side; others, and all with `longest` None, unchanged. At 224 px
    to 112 that takes every other pixel: a Broden mask stored at 112 and read at 224 comes back exactly."""
    first = next(iter(masks.values()))
    height, width = first.shape[-2:]
    if longest is None or max(height, width) <= longest:
        return dict(masks)
    h, w = (max(1, round(n * longest / max(height, width))) for n in (height, width))
    rows = (torch.arange(h, dtype=torch.float64) * (height / h)).floor().long().clamp_(max=height - 1)
    cols = (torch.arange(w, dtype=torch.float64) * (width / w)).floor().long().clamp_(max=width - 1)
    rows, cols = rows.to(first.device), cols.to(first.device)
    return {cat: m.index_select(-2, rows).index_select(-1, cols) for cat, m in masks.items()}


def forward(model: ImageClassifier, layers: Sequence[str], images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and the detached activations of `layers`, without gradients."""
    with torch.no_grad(), capture(model, layers, detach=True) as acts:
        logits = model(images)
        return logits, dict(acts)


class ChunkStream:
    """Reads a concept dataset in forward batches and yields chunks. The first pass over the data fixes the chunk
    size in images (from the first batch's bytes), so every later pass, and the cache, chunk the same way."""

    def __init__(self, dataset: Dataset, table: MaskTable, device: torch.device, *, batch_size: int,
                 chunk_bytes: int, num_workers: int = 0, max_images: int | None = None,
                 labelled: bool = True, mask_size: int | None = None) -> None:
        n = len(dataset) if max_images is None else min(len(dataset), max_images)
        self.mask_size = mask_size  # masks with a longer side are subsampled to it (`mask_resolution`)
        self.labelled = labelled  # False: the images' classes are not the model's (ignore them)
        self.dataset = dataset if n == len(dataset) else Subset(dataset, range(n))
        self.images = n
        self.table, self.device = table, device
        self.batch_size, self.chunk_bytes, self.num_workers = batch_size, chunk_bytes, num_workers
        self.chunk_images: int | None = None

    def __call__(self, desc: str, model: ImageClassifier | None = None, layers: Sequence[str] = (),
                 *, keep_images: bool = False, contains: bool = False) -> Iterator[Chunk]:
        """Chunks in dataset order; with `model`, each carries the activations of `layers`."""
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        buffer: _ChunkBuffer | None = None
        start = 0
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            images, labels, masks = unpack(batch)
            masks = mask_resolution(masks, self.mask_size)
            labels = labels if self.labelled else None
            images = images.to(self.device)
            acts = forward(model, layers, images)[1] if model is not None else {}
            present, size = self.table.present(masks), images.shape[0]
            if buffer is not None and not buffer.takes(present, size):
                yield buffer.chunk(start, self.table, contains)
                start, buffer = start + buffer.held, None
            if buffer is None:
                if self.chunk_images is None:
                    self.chunk_images = self._chunk_images(size, acts, masks, present)
                buffer = _ChunkBuffer(max(self.chunk_images, size), acts, masks, present, self.table, self.device)
            buffer.add(acts, masks, images if keep_images else None,
                       None if labels is None else labels.to(self.device), self.table)
            if buffer.full:
                yield buffer.chunk(start, self.table, contains)
                start, buffer = start + buffer.held, None
        if buffer is not None:
            yield buffer.chunk(start, self.table, contains)

    def _chunk_images(self, batch: int, acts: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                      present: list[int]) -> int:
        mask_bytes = len(present) * masks[self.table.categories[present[0]]][0].numel() * self.table.dtype.itemsize
        per_image = sum(a[0].numel() * a.element_size() for a in acts.values()) + mask_bytes
        whole_batches = int(self.chunk_bytes // max(1, per_image)) // self.batch_size
        return max(1, whole_batches) * self.batch_size


class _ChunkBuffer:
    """Preallocated tensors that one chunk fills batch by batch. Each batch's activations and masks are copied in
    right after its forward pass, while they are still in the CPU cache, instead of concatenated at the end."""

    def __init__(self, capacity: int, acts: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 present: list[int], table: MaskTable, device: torch.device) -> None:
        self.capacity, self.present, self.held = capacity, present, 0
        self.acts = {name: a.new_empty((capacity, *a.shape[1:])) for name, a in acts.items()}
        shape = masks[table.categories[present[0]]].shape[1:]
        self.masks = torch.empty((capacity, *shape, len(present)), dtype=table.dtype, device=device)
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor | None] = []

    def takes(self, present: list[int], size: int) -> bool:
        return present == self.present and self.held + size <= self.capacity

    @property
    def full(self) -> bool:
        return self.held >= self.capacity

    def add(self, acts: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], images: torch.Tensor | None,
            labels: torch.Tensor | None, table: MaskTable) -> None:
        rows = slice(self.held, self.held + next(iter(masks.values())).shape[0])
        for name, a in acts.items():
            self.acts[name][rows].copy_(a)
        table.stack(masks, self.masks.device, out=self.masks[rows], clamp=False)  # clamped once per chunk
        if images is not None:
            self.images.append(images)
        self.labels.append(labels)
        self.held = rows.stop

    def chunk(self, start: int, table: MaskTable, contains: bool) -> Chunk:
        def cat(items: list[torch.Tensor]) -> torch.Tensor:
            return items[0] if len(items) == 1 else torch.cat(items)

        labels = cat(self.labels) if all(t is not None for t in self.labels) else None
        acts = {name: a[: self.held] for name, a in self.acts.items()}
        masks = table.prepare(self.present, table.clamp(self.masks[: self.held]), contains=contains)
        return Chunk(start, masks, labels, acts, cat(self.images) if self.images else None)
