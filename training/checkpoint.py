"""Crash-safe checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
`last.pt`; a process killed mid-write leaves the previous checkpoint intact. It holds the model, optimizer,
LR scheduler and AMP scaler states, the python / numpy / torch / CUDA RNG states of every rank, the global
step, the epoch and how many batches of that epoch are done (the sampler position).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done in all; in epoch `epoch`, `batch` batches done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from (this process only)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    position: Position,
    rng_states: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. `rng_states` holds one entry per rank (index = rank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "position": vars(position).copy(),
        "rng": rng_states,
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save` (our own file: it holds RNG states, so it is not weights-only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def restore(
    payload: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rank: int = 0,
) -> Position:
    """Put every state back (RNG of this `rank` included) and return where training stands."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    states = payload["rng"]
    if rank >= len(states):
        raise RuntimeError(f"checkpoint holds RNG states for {len(states)} ranks; this is rank {rank}")
    set_rng_state(states[rank])
    return Position(**payload["position"])


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
