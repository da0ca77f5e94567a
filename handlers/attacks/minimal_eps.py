"""Per-sample minimal flipping ε: the smallest budget at which an attack succeeds, to a tolerance.

Batched twice: every sample and every candidate ε of the coarse grid go through the attack in one pass, then
all unresolved samples bisect together. ε values live on the lattice lo + k·tol, so bisection ends with a
verified failure exactly one tolerance below the returned ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InvalidInput
from .base import Attack, AttackResult, check_eps, check_steps, validate_batch

AttackFactory = Callable[[torch.Tensor], Attack]  # (M,) per-sample ε -> attack


class MinimalEpsilon:
    """Smallest ε in `eps_range` at which `attack_factory(eps)` succeeds, per sample, to within `tol`.

    Guarantee, for every sample with `success`: the attack succeeds at the returned ε and fails at ε − tol
    (unless ε is the bottom of the range). Failures get ε = inf. The attack must be deterministic for this to
    mean anything: build it with `random_start=False` (or a fixed seed that does not depend on the batch).

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.eps (N,).

    Example::

        search = MinimalEpsilon(lambda e: PGD(model, eps=e, alpha=e / 4, steps=10, random_start=False),
                                eps_range=(0, 16/255), tol=1/1020)
        result = search(images, labels)     # result.eps: minimal flipping ε per sample
    """

    def __init__(
        self,
        attack_factory: AttackFactory,
        eps_range: tuple[float, float] = (0.0, 16 / 255),
        tol: float = 1 / 1020,
        candidates: int = 8,
        *,
        targeted: bool = False,
    ) -> None:
        lo, hi = eps_range
        check_eps(lo, "eps_range")
        check_eps(hi, "eps_range")
        if not hi > lo:
            raise InvalidInput("eps_range", f"needs low < high, got {eps_range}")
        if not 0 < tol <= hi - lo:
            raise InvalidInput("tol", f"must lie in (0, {hi - lo}], got {tol}")
        check_steps(candidates, "candidates")
        if candidates < 2:
            raise InvalidInput("candidates", f"need at least 2 grid points, got {candidates}")
        self.factory, self.lo, self.tol, self.targeted = attack_factory, float(lo), float(tol), targeted
        self.top = math.floor((hi - lo) / tol + 1e-9)  # the highest lattice index inside the range
        self.candidates = min(candidates, self.top + 1)

    def _eps(self, k: torch.Tensor) -> torch.Tensor:
        return (self.lo + k.double() * self.tol).float()

    def _run(
        self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None, eps: torch.Tensor
    ) -> AttackResult:
        return self.factory(eps.to(images.device))(images, labels, target)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None
    ) -> AttackResult:
        validate_batch(images, labels, target, None, self.targeted)
        n, dev = images.shape[0], images.device
        # 1. coarse grid: every (candidate, sample) pair in one batch.
        ticks = torch.linspace(0, self.top, self.candidates, dtype=torch.float64).round().long()
        c = ticks.numel()
        eps_grid = self._eps(ticks.repeat_interleave(n))
        grid = self._run(images.repeat(c, 1, 1, 1), labels.repeat(c), _rep(target, c), eps_grid)
        ok = grid.success.view(c, n).cpu()
        found = ok.any(0)
        first = ok.float().argmax(0)  # first successful candidate
        k_hi = torch.where(found, ticks[first], torch.full_like(first, self.top))
        k_lo = torch.where(first > 0, ticks[(first - 1).clamp_min(0)], torch.full_like(first, -1))
        # 2. bisection on the lattice, all open samples together: fail at k_lo, success at k_hi.
        while True:
            open_ = found & (k_lo >= 0) & (k_hi - k_lo > 1)
            idx = open_.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            mid = (k_lo[idx] + k_hi[idx]) // 2
            hit = self._run(images[idx], labels[idx], _sel(target, idx), self._eps(mid)).success.cpu()
            k_hi[idx[hit]], k_lo[idx[~hit]] = mid[hit], mid[~hit]
        # 3. final pass at the returned float ε and at ε - tol as a caller would compute them; walk down where a
        #    non-monotone attack still flips one tolerance below.
        eps = self._eps(k_hi)
        adv = grid.adv.view(c, n, *images.shape[1:])[-1].clone()
        logits = grid.logits.view(c, n, -1)[-1].clone()
        todo = found.nonzero().squeeze(1)
        while todo.numel():
            below = eps[todo] - self.tol
            check = below >= self.lo - 1e-12
            both = torch.cat([eps[todo], below[check]])
            sel = torch.cat([todo, todo[check]])
            res = self._run(images[sel], labels[sel], _sel(target, sel), both)
            m = todo.numel()
            adv[todo], logits[todo] = res.adv[:m], res.logits[:m]
            flips_below = torch.zeros(m, dtype=torch.bool)
            flips_below[check] = res.success[m:].cpu()
            # A batch-dependent attack may also miss at ε now: step up a tolerance (give up past the range).
            misses = ~res.success[:m].cpu() & ~flips_below
            eps[todo[flips_below]] = below[flips_below]
            eps[todo[misses]] += self.tol
            gone = todo[misses & (eps[todo] > self._eps(torch.tensor(self.top)) + 1e-9)]
            found[gone] = False
            todo = todo[(flips_below | misses) & found[todo]]
        eps = torch.where(found, eps, torch.full_like(eps, float("inf"))).to(dev)
        return AttackResult(adv, found.to(dev), eps, logits)


def _rep(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(times)


def _sel(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx.to(t.device)]
