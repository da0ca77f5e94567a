"""Adversarial pools compute their flip rates from what the attacks did: a planted model that cannot be fooled
gives empty pools that say so, and a planted model with a known decision boundary flips exactly the images
within the ε cap, at their known minimal ε."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conceptlens.training.pools import confident_pool, flipped_subset, fooled_rate, minimal_eps_pool, transfer_pool


class NeverFooled(nn.Module):
    """Logits that ignore the image: no perturbation can change the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2) + 0 * x.sum(dim=(1, 2, 3))[:, None]


class MeanBrightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5: an L∞ attack of budget ε moves the mean by at most ε, so an image
    of constant value c flips exactly when ε > |c − 0.5|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 200 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-s, s], dim=1)


def _constant_images(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


def test_a_model_that_is_never_fooled_gives_empty_pools_and_says_so():
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = NeverFooled()
    pool = minimal_eps_pool(model, x, eps_cap=16 / 255, steps=3, candidates=3)
    assert pool.size == 0 and pool.attempted == 6 and pool.flip_rate == 0.0
    assert pool.note.startswith("empty: the model was never fooled within eps <= 0.0627")
    confident = confident_pool(model, x, eps_schedule=(8 / 255, 32 / 255), steps=3)
    assert confident.size == 0 and confident.flip_rate == 0.0 and confident.note.startswith("empty")
    shared, targets = transfer_pool([MeanBrightness()], x, torch.zeros(6, dtype=torch.long), eps=8 / 255, steps=3)
    assert fooled_rate(model, x, shared, targets)["flip"] == 0.0
    assert flipped_subset(model, x, shared).size == 0


def test_flip_rate_and_minimal_eps_follow_the_known_boundary():
    values = [0.45, 0.49, 0.53, 0.8, 0.1]  # |c - 0.5| = 0.05, 0.01, 0.03 flip under a 16/255 cap; 0.3, 0.4 cannot
    pool = minimal_eps_pool(MeanBrightness(), _constant_images(values), eps_cap=16 / 255, steps=5, candidates=4)
    assert pool.attempted == 5 and sorted(pool.source.tolist()) == [0, 1, 2]
    assert pool.flip_rate == pytest.approx(3 / 5)
    for i, eps in zip(pool.source, pool.eps, strict=True):
        assert abs(values[i] - 0.5) < eps <= abs(values[i] - 0.5) + 1 / 255 + 1e-6
    after = MeanBrightness()(pool.adv).argmax(1)
    before = MeanBrightness()(_constant_images(values)[torch.as_tensor(pool.source)]).argmax(1)
    assert torch.all(after != before)  # every image in the pool really flips the model


def test_confident_pool_reaches_the_probability_it_claims():
    x = _constant_images([0.48, 0.7, 0.2])  # flip beyond ε = 0.02, 0.2 and 0.3
    pool = confident_pool(MeanBrightness(), x, eps_schedule=(8 / 255, 64 / 255), steps=10, min_prob=0.9)
    assert pool.source.tolist() == [0, 1] and pool.flip_rate == pytest.approx(2 / 3)  # 0.2 needs ε > 0.3
    probs = torch.softmax(MeanBrightness()(pool.adv), dim=1)
    clean = MeanBrightness()(x[:2]).argmax(1)
    wrong = probs[torch.arange(2), 1 - clean]
    assert torch.all(wrong >= 0.9)
    assert np.allclose(pool.eps, [8 / 255, 64 / 255])
