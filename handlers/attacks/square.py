"""Square attack: a score-based black-box attack by random square updates, L∞.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020. It only ever calls `predict(images) -> logits`, under `torch.no_grad()`: no gradient.
"""

from __future__ import annotations

import math

import torch

from .base import Attack, AttackParams, Eps, Predict, check_steps, per_sample


def _p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels changed at iteration `it`: halved at the paper's fixed points (scaled to 10k queries)."""
    it = int(it / n_queries * 10000)
    for halvings, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2**halvings
    return p_init / 512


def margin(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample margin the attack drives below zero: true-class logit minus the best other (untargeted), or
    the best non-target logit minus the target's (targeted)."""
    cls = labels if target is None else target
    own = logits.gather(1, cls[:, None]).squeeze(1)
    other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
    return own - other if target is None else other - own


class Square(Attack):
    """Square attack, L∞, untargeted or targeted, with `n_queries` calls to `predict` at most.

    Start: vertical stripes of ±ε. Each iteration redraws, for every sample not yet fooled, one random square
    window (side ≈ √(p·H·W), p shrinking on the paper's schedule) to ±ε per channel, and keeps the change if it
    lowers the margin. `seed` fixes the random draws. `per_image=True` runs the images one at a time, each with
    the same seed, so an image's squares depend only on it and ε, not on which images share its batch: the
    minimal-ε search needs such a deterministic attack (with a batch-dependent one its final verification walk
    can step up and down forever).

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).

    Example::

        atk = Square(lambda x: session.run(x), eps=8/255, n_queries=1000)   # any logits function
        result = atk(images, labels)
    """

    def __init__(
        self,
        predict: Predict,
        eps: Eps = 8 / 255,
        n_queries: int = 1000,
        *,
        p_init: float = 0.05,
        targeted: bool = False,
        seed: int = 0,
        per_image: bool = False,
    ) -> None:
        super().__init__(predict, eps, targeted=targeted)
        check_steps(n_queries, "n_queries")
        self.n_queries, self.p_init, self.seed, self.per_image = n_queries, p_init, seed, per_image

    @classmethod
    def from_params(cls, model: Predict, params: AttackParams) -> Square:
        return cls(model, params.eps, params.steps, targeted=params.targeted, seed=params.seed or 0,
                   per_image=params.deterministic)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if not self.per_image:
            return self._perturb(images, labels, target, per_sample(self.eps, images))
        eps = per_sample(self.eps, images)
        return torch.cat([self._perturb(images[i : i + 1], labels[i : i + 1],
                                        None if target is None else target[i : i + 1], eps[i : i + 1])
                          for i in range(images.shape[0])])

    @torch.no_grad()
    def _perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None,
                 eps: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        gen = torch.Generator(device=images.device).manual_seed(self.seed)

        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=images.device).to(images.dtype) * 2 - 1

        x = (images + eps * signs(n, c, 1, w)).clamp(0, 1)
        loss = margin(self.model(x), labels, target)
        rows = torch.arange(h, device=images.device)
        cols = torch.arange(w, device=images.device)
        for it in range(self.n_queries - 1):
            if self.callback is not None:
                self.callback(it)
            idx = (loss > 0).nonzero().squeeze(1)  # only samples not fooled yet cost queries
            if idx.numel() == 0:
                break
            k = idx.numel()
            side = min(max(round(math.sqrt(self._p(it) * h * w)), 1), h - 1, w - 1) or 1
            top = torch.randint(0, h - side + 1, (k, 1), generator=gen, device=images.device)
            left = torch.randint(0, w - side + 1, (k, 1), generator=gen, device=images.device)
            in_rows = (rows >= top) & (rows < top + side)  # (k, h)
            in_cols = (cols >= left) & (cols < left + side)  # (k, w)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (k, 1, h, w)
            x0 = images[idx]
            delta = torch.where(window, eps[idx] * signs(k, c, 1, 1), x[idx] - x0)
            candidate = (x0 + delta).clamp(0, 1)
            new_loss = margin(self.model(candidate), labels[idx], None if target is None else target[idx])
            better = new_loss < loss[idx]
            x[idx[better]] = candidate[better]
            loss[idx[better]] = new_loss[better]
        return x

    def _p(self, it: int) -> float:
        return _p_schedule(self.p_init, it, self.n_queries)
