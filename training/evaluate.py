"""Clean accuracy and robust accuracy under PGD-k, overall and per class.

Robust accuracy is the share of images still classified correctly after an untargeted PGD attack from the
attack library (the same PGD the trainer and the service's probes use). It is measured on the first
`robust_n` images of the dataset (a fixed prefix, so epochs and runs are comparable), clean accuracy on all
`n`. The attack's random start is drawn from a generator seeded with `seed` inside `torch.random.fork_rng`,
so evaluating never disturbs the training run's random streams (needed for bit-exact resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from conceptlens.handlers.modes import eval_mode

from .distributed import DistEnv, all_reduce_sum


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule of thumb: 2.5·ε/k, so k steps can cross the ε-ball and back."""
    return 2.5 * eps / steps


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    n: int | None = None,
    robust_n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    random_start: bool = True,
    env: DistEnv | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of `model` (an ImageClassifier taking [0,1] images) on `dataset`, clean and under PGD-`steps`.

    With several processes each rank evaluates its own shard and the counts are summed, so every rank returns
    the same result. `robust_n=0` or `steps=0` skips the attack. `random_start=False` starts PGD at the clean
    images (deterministic whatever the batching, e.g. to compare with a service probe).
    """
    env = env or DistEnv()
    device = next(model.parameters()).device
    classes: Sequence[str] = getattr(dataset, "classes", None) or getattr(model, "classes", [])
    k = len(classes)
    n = len(dataset) if n is None else min(n, len(dataset))
    robust_n = n if robust_n is None else min(robust_n, n)
    if steps == 0 or eps == 0:
        robust_n = 0

    counts = torch.zeros(4, k, dtype=torch.float64, device=device)  # clean n, clean ok, robust n, robust ok
    shard = list(range(env.rank, n, env.world_size))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False)
    attack = None
    if robust_n:
        from conceptlens.handlers.attacks import AttackParams, make_attack

        size = step_size if step_size is not None else default_step_size(eps, steps)
        attack = make_attack("pgd", model, AttackParams(eps=eps, step_size=size, steps=steps, norm=norm,
                                                        random_start=random_start))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        done = 0
        for images, labels in tqdm(loader, desc="evaluate", disable=not (progress and env.is_main), leave=False):
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad(), eval_mode(model):
                pred = model(images).argmax(1)
            counts[0].index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
            counts[1].index_add_(0, labels, (pred == labels).to(counts.dtype))
            # this rank's images with global index < robust_n are attacked
            index = torch.tensor(shard[done : done + len(labels)], device=device)
            done += len(labels)
            keep = index < robust_n
            if attack is not None and keep.any():
                result = attack(images[keep], labels[keep])
                ok = (result.logits.argmax(1) == labels[keep]).to(counts.dtype)
                counts[2].index_add_(0, labels[keep], torch.ones_like(ok))
                counts[3].index_add_(0, labels[keep], ok)
    counts = all_reduce_sum(counts, env).cpu()
    return _summary(counts, classes, eps=eps, steps=steps, norm=norm, attacked=attack is not None)


def _summary(
    counts: torch.Tensor, classes: Sequence[str], *, eps: float, steps: int, norm: str, attacked: bool
) -> dict[str, Any]:
    def ratio(ok: torch.Tensor, total: torch.Tensor) -> float | None:
        return float(ok / total) if total > 0 else None

    per_class = {
        name: {
            "n": int(counts[0, i]), "clean_accuracy": ratio(counts[1, i], counts[0, i]),
            "robust_n": int(counts[2, i]), "robust_accuracy": ratio(counts[3, i], counts[2, i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "n": int(counts[0].sum()),
        "clean_accuracy": ratio(counts[1].sum(), counts[0].sum()),
        "robust_n": int(counts[2].sum()),
        "robust_accuracy": ratio(counts[3].sum(), counts[2].sum()) if attacked else None,
        "attack": {"name": "pgd", "eps": eps, "steps": steps, "norm": norm} if attacked else None,
        "per_class": per_class,
    }
