"""The one-cycle schedule on short runs: every step count gets finite learning rates, never a ZeroDivisionError
(a fine-tune on a few images has only a handful of steps)."""

from __future__ import annotations

import math

import pytest
import torch

from conceptlens.training import config as train_config
from conceptlens.training.trainer import make_scheduler


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 31])
def test_onecycle_runs_every_step_of_a_short_run(steps):
    cfg = train_config.load(None, ["optim.schedule=onecycle", "optim.warmup_fraction=0.25", "run.epochs=1"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(math.isfinite(r) and r >= 0 for r in rates)
    if steps >= 5:
        assert max(rates) == pytest.approx(cfg.optim.lr, rel=0.05)  # the cycle still peaks at the set rate
