"""Pass 1's chunks spilled to disk so pass 2 reads them back instead of running the model again.

NetDissect-Lite caches features the same way. One raw file of sequential records, each a few named tensors
(a chunk's candidate maps, compact masks and class labels), read back in write order. Plain file I/O into
preallocated tensors (no mmap), so the resident memory stays that of one chunk; the file is deleted on exit.
Records stay in memory while they fit a budget (the newest one always), and only older ones are spilled: a small
dataset never touches the disk, and a big one keeps its last records in memory.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ChunkCache:
    """Disabled (a no-op) without a directory. At the first record it estimates the whole cache from that record
    and `expected_images`, and switches itself off with a warning when that would need more than half the free
    disk space (pass 2 then runs the model again: slower, same result). `memory_bytes`: how much of the newest
    records to hold in memory before spilling the oldest."""

    def __init__(self, directory: str | None, expected_images: int = 0, memory_bytes: int = 0) -> None:
        self.enabled = directory is not None
        self.expected_images = expected_images
        self.memory_bytes = memory_bytes
        self._layouts: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []  # per record on disk
        self._held: deque[dict[str, torch.Tensor]] = deque()  # the newest records, not on disk
        self._next = 0
        self._file: Any = None
        if self.enabled:
            root = Path(directory)
            root.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="dissect-", dir=root)
            self._path = Path(self._tmp.name) / "chunks.bin"
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in close()

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._layouts) + len(self._held)

    def close(self) -> None:
        self._held.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.enabled:
            self._tmp.cleanup()
            self.enabled = False

    def write(self, record: Mapping[str, torch.Tensor], images: int) -> None:
        """Append one record (name -> tensor) covering `images` images."""
        if not self.enabled:
            return
        if not self._held and not self._layouts and not self._fits(record, images):
            return
        self._held.append(dict(record))
        while len(self._held) > 1 and sum(_nbytes(r) for r in self._held) > self.memory_bytes:
            self._spill(self._held.popleft())

    def _spill(self, record: Mapping[str, torch.Tensor]) -> None:
        layout = []
        for name, tensor in record.items():
            t = tensor.detach().contiguous().cpu()
            layout.append((name, tuple(t.shape), t.dtype))
            self._file.write(t.view(-1).view(torch.uint8).numpy().data)
        self._layouts.append(layout)

    def _fits(self, record: Mapping[str, torch.Tensor], images: int) -> bool:
        per_image = _nbytes(record) / max(1, images)
        need = per_image * max(images, self.expected_images)
        free = shutil.disk_usage(self._tmp.name).free
        if need <= free // 2:
            return True
        log.warning("dissect: the activation cache needs %.1f GB but %s has %.1f GB free; running the model "
                    "again in pass 2 instead", need / 1e9, self._tmp.name, free / 1e9)
        self.close()
        return False

    def rewind(self) -> None:
        """Start reading from the first record (closes the file for writing)."""
        if self.enabled:
            self._file.close()
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed in close()
            self._next = 0

    def read(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The next record, on `device`."""
        if self._next >= len(self._layouts):
            self._next += 1
            return {name: t.to(device) for name, t in self._held[self._next - 1 - len(self._layouts)].items()}
        out = {}
        for name, shape, dtype in self._layouts[self._next]:
            t = torch.empty(shape, dtype=dtype)
            self._file.readinto(t.view(-1).view(torch.uint8).numpy().data)
            out[name] = t.to(device)
        self._next += 1
        return out


def _nbytes(record: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in record.values())
