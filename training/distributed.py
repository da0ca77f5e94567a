"""Data-parallel plumbing: torchrun detection, process groups, the resumable distributed sampler.

Started by `torchrun --nproc_per_node=N -m conceptlens train ...`, each process reads RANK, WORLD_SIZE and
LOCAL_RANK from the environment; gloo is used on CPU and nccl on GPU. Without those variables everything
degrades to one process (world size 1) and no process group is created.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (config, metrics, checkpoints, weights) and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect() -> DistEnv:
    """The launcher's view of this process (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """"auto" means this rank's GPU when CUDA is present, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (gloo for CPU tensors, nccl for CUDA); nothing to do for one process."""
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    return all_reduce_sum(t, env) / env.world_size if env.distributed else t


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (used for per-rank RNG states in checkpoints)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start mid-epoch.

    The order depends only on (seed, epoch), so a resumed run skips exactly the `start_batch * batch_size`
    samples this rank had already consumed and sees the same remaining batches as an uninterrupted run.
    Also used with one process (num_replicas=1), so single- and multi-process runs share one code path.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, *, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_start(self, samples: int) -> None:
        """Skip the first `samples` samples of this rank's shard (the trainer sets it every epoch)."""
        self.start = samples

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
