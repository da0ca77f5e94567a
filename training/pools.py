"""Adversarial pools that are adversarial (issue 13): every pool keeps only attacks that did what they claim, and
says how often that was.

- `minimal_eps_pool`: white-box against the evaluated model itself, each image at its minimal flipping ε
  (`MinimalEpsilon` over PGD started at the clean image); only images whose prediction flips within `eps_cap`.
- `confident_pool`: white-box PGD with growing ε until the wrong class has probability >= `min_prob` (0.9): the
  case a max-softmax detector is blind to by construction. Only images that got there within the ε schedule.
- `transfer_pool`: the paper's shared pool, made once per experiment by the ensemble-optimisation attack
  (targeted MI-FGSM on the mean logits of held-out surrogate models and ghost networks of each, docs/design.md §5)
  and then shown to every evaluated model; `fooled_rate` says how often each one follows it.

All attacks come from the one catalogue in `handlers/attacks`. Labels are the model's own clean predictions, so
"flip" means the prediction changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from conceptlens.handlers.attacks import PGD, EnsembleAttack, GhostNetwork, MinimalEpsilon
from conceptlens.handlers.modes import eval_mode


@dataclass
class Pool:
    """Adversarial images `adv` (m,C,H,W) made from source images `source` (indices into the attacked batch),
    each with the ε it used; `attempted` images were attacked, so `flip_rate` = m / attempted."""

    name: str
    adv: torch.Tensor
    source: np.ndarray
    eps: np.ndarray
    attempted: int
    note: str = ""

    @property
    def size(self) -> int:
        return int(self.source.size)

    @property
    def flip_rate(self) -> float:
        return self.size / self.attempted if self.attempted else float("nan")

    def summary(self) -> dict[str, object]:
        finite = self.eps[np.isfinite(self.eps)]
        return {"name": self.name, "size": self.size, "attempted": self.attempted, "flip_rate": self.flip_rate,
                "median_eps": float(np.median(finite)) if finite.size else None, "note": self.note}


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of `model` for `images`, in batches, without gradients, in eval mode."""
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def minimal_eps_pool(model: torch.nn.Module, images: torch.Tensor, *, eps_cap: float = 32 / 255,
                     steps: int = 10, tol: float = 1 / 255, candidates: int = 5, batch_size: int = 64) -> Pool:
    """Each image at its minimal flipping ε (to `tol`) against `model`, kept only when it flips within `eps_cap`."""
    labels = predict(model, images).argmax(1)
    search = MinimalEpsilon(lambda e: PGD(model, eps=e, alpha=e / 4, steps=steps, random_start=False),
                            eps_range=(0.0, eps_cap), tol=tol, candidates=candidates)
    advs, keep, eps_all = [], [], []
    for start in range(0, len(images), batch_size):
        result = search(images[start : start + batch_size], labels[start : start + batch_size])
        ok = result.success.cpu()
        advs.append(result.adv[ok].detach().cpu())
        keep.append(ok.nonzero().squeeze(1).numpy() + start)
        eps_all.append(result.eps.cpu().numpy()[ok.numpy()])
    pool = _pool("white_box_min_eps", advs, keep, eps_all, len(images), images)
    if pool.size == 0:
        pool.note = f"empty: the model was never fooled within eps <= {eps_cap:.4f} ({eps_cap * 255:.0f}/255)"
    return pool


def confident_pool(model: torch.nn.Module, images: torch.Tensor, *,
                   eps_schedule: Sequence[float] = (8 / 255, 16 / 255, 32 / 255, 64 / 255), steps: int = 20,
                   min_prob: float = 0.9, batch_size: int = 64) -> Pool:
    """PGD at each ε of `eps_schedule` in turn until some wrong class gets probability >= `min_prob`; images that
    never get there are left out (and counted in `attempted`)."""
    labels = predict(model, images).argmax(1)
    n = len(images)
    done = torch.zeros(n, dtype=torch.bool)
    adv = images.detach().cpu().clone()
    eps_used = np.full(n, math.inf)
    for eps in eps_schedule:
        todo = (~done).nonzero().squeeze(1)
        for start in range(0, todo.numel(), batch_size):
            idx = todo[start : start + batch_size]
            result = PGD(model, eps=eps, steps=steps, random_start=False)(images[idx], labels[idx])
            probs = torch.softmax(result.logits.detach().cpu().float(), dim=1)
            probs[torch.arange(idx.numel()), labels[idx].cpu()] = 0
            hit = probs.max(1).values >= min_prob
            done[idx[hit]] = True
            adv[idx[hit]] = result.adv[hit].detach().cpu()
            eps_used[idx[hit].numpy()] = eps
    keep = done.nonzero().squeeze(1).numpy()
    pool = Pool("confident", adv[keep], keep, eps_used[keep], n)
    if pool.size == 0:
        pool.note = f"empty: no wrong class reached p >= {min_prob} within eps <= {max(eps_schedule):.4f}"
    return pool


def transfer_pool(surrogates: Sequence[torch.nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
                  eps: float = 16 / 255, steps: int = 10, ghosts: int = 1, seed: int = 0,
                  batch_size: int = 64) -> tuple[Pool, torch.Tensor]:
    """The shared pool: targeted ensemble MI-FGSM against `surrogates` plus `ghosts` ghost networks of each, every
    image to a random other class. Returns (pool of all attacked images, their targets). The pool's flip rate is
    the ensemble's own success; `fooled_rate` gives each evaluated model's."""
    members: list[torch.nn.Module] = list(surrogates)
    for i, model in enumerate(surrogates):
        members += [GhostNetwork(model, seed=seed * 1000 + 10 * i + g) for g in range(ghosts)]
    gen = torch.Generator().manual_seed(seed)
    n_classes = int(predict(surrogates[0], images[:1]).shape[1])
    targets = (labels.cpu() + torch.randint(1, n_classes, (len(labels),), generator=gen)) % n_classes
    attack = EnsembleAttack(members, eps=eps, steps=steps, targeted=True)
    advs, ok = [], []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        result = attack(images[sl], labels[sl], targets[sl].to(images.device))
        advs.append(result.adv.detach().cpu())
        ok.append(result.success.cpu())
    success = torch.cat(ok)
    pool = Pool("transfer", torch.cat(advs), np.arange(len(images)), np.full(len(images), eps), len(images),
                note=f"ensemble success {float(success.float().mean()):.3f}; every image kept, flips per model "
                     "in fooled_rate")
    return pool, targets


def fooled_rate(model: torch.nn.Module, clean: torch.Tensor, pool: Pool,
                targets: torch.Tensor | None = None) -> dict[str, float]:
    """How often `model` follows the pool: its prediction changed from the clean one ("flip"), and, with
    `targets`, moved to the attack's target ("target_hit")."""
    if pool.size == 0:
        return {"flip": float("nan"), "target_hit": float("nan")}
    before = predict(model, clean[torch.as_tensor(pool.source)]).argmax(1).cpu()
    after = predict(model, pool.adv.to(clean.device)).argmax(1).cpu()
    out = {"flip": float((before != after).float().mean())}
    if targets is not None:
        out["target_hit"] = float((after == targets[torch.as_tensor(pool.source)].cpu()).float().mean())
    return out


def flipped_subset(model: torch.nn.Module, clean: torch.Tensor, pool: Pool) -> Pool:
    """The part of a shared pool that flips `model`'s prediction: the only images a detector is scored on."""
    if pool.size == 0:
        return pool
    before = predict(model, clean[torch.as_tensor(pool.source)]).argmax(1).cpu()
    after = predict(model, pool.adv.to(clean.device)).argmax(1).cpu()
    keep = (before != after).numpy()
    return Pool(pool.name, pool.adv[torch.from_numpy(keep)], pool.source[keep], pool.eps[keep], pool.attempted,
                pool.note)


def _pool(name: str, advs, keep, eps, attempted: int, like: torch.Tensor) -> Pool:
    adv = torch.cat(advs) if advs else like[:0].cpu()
    source = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    return Pool(name, adv, source.astype(np.int64), np.concatenate(eps) if eps else np.zeros(0), attempted)
