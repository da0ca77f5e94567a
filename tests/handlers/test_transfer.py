"""Transfer report: adversarial images made on model A, judged on a held-out model B (different training seed).

The ghost-network ensemble attack (MI-FGSM through ghosts of A, redrawn every step) must transfer at least as
well as single-model PGD with the same ε and number of steps. Run with `-s` to see the figures.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conceptlens.handlers.attacks import PGD, GhostEnsemble

log = logging.getLogger(__name__)

EPS, STEPS = 24 / 255, 10  # at 16/255 hardly anything transfers on ShapesWorld; at 32/255 half does


@pytest.mark.slow
def test_ghost_ensemble_transfers_at_least_as_well_as_pgd(shapes_model, shapes_model_b, shapes_batch) -> None:
    images, labels = shapes_batch
    with torch.no_grad():  # only images both models get right: a "transfer" must be caused by the attack
        ok = (shapes_model(images).argmax(1) == labels) & (shapes_model_b(images).argmax(1) == labels)
    images, labels = images[ok], labels[ok]
    assert len(labels) >= 48

    rates = {}
    for name, atk in (
        ("pgd", PGD(shapes_model, eps=EPS, steps=STEPS, seed=0)),
        ("ghost-ensemble", GhostEnsemble(shapes_model, eps=EPS, steps=STEPS, members=2, seed=0)),
    ):
        result = atk(images, labels)
        with torch.no_grad():
            fooled_b = shapes_model_b(result.adv).argmax(1) != labels
        rates[name] = (result.success.float().mean().item(), fooled_b.float().mean().item())
    report = ", ".join(f"{k}: white-box {a:.2f} -> transfer {b:.2f}" for k, (a, b) in rates.items())
    print(f"\ntransfer A->B at eps={EPS * 255:.0f}/255, {STEPS} steps, n={len(labels)}: {report}")
    log.info("transfer %s", report)
    assert rates["ghost-ensemble"][1] >= rates["pgd"][1], report
