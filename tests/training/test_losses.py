"""The consistent loss is what design.md §5 says, term by term, on real tensors and a real (tiny) model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conceptlens.handlers import zoo
from conceptlens.handlers.attacks.pgd import PGD
from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.training import losses
from conceptlens.training.config import AttackConfig, LossConfig, TrainConfig
from conceptlens.training.trainer import batch_loss

CLASSES = [f"c{i}" for i in range(4)]
LAYERS = ("layer2", "layer3")


@pytest.fixture()
def model() -> zoo.ImageClassifier:
    torch.manual_seed(0)
    return zoo.build_model("small_cnn", CLASSES, input_size=16).train()


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)


def _config(attack: str = "pgd", lam: float = 1.0, alpha: float = 1.0, distance: str = "relative") -> TrainConfig:
    return TrainConfig(
        attack=AttackConfig(name=attack, eps=8 / 255, step_size=2 / 255, steps=2),
        loss=LossConfig(adv_weight=alpha, consistency_weight=lam, distance=distance, layers=LAYERS),
    )


def test_relative_distance_is_per_sample_squared_error_over_clean_norm() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    # sample 0: 16 / 25, sample 1: 1 / 1 -> mean 0.82
    assert losses.relative_squared(a, b).item() == pytest.approx((16 / 25 + 1.0) / 2)


def test_relative_distance_is_scale_free_and_zero_only_when_equal() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, 3, 3, generator=g), torch.randn(5, 8, 3, 3, generator=g)
    assert losses.relative_squared(a, a).item() == 0.0
    assert losses.relative_squared(a, b) > 0
    assert losses.relative_squared(7 * a, 7 * b).item() == pytest.approx(losses.relative_squared(a, b).item())


def test_relative_distance_does_not_push_clean_norm_up() -> None:
    """The clean norm is a scale (detached): the gradient wrt the clean map is that of the numerator only."""
    a = torch.tensor([[2.0, 0.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0]])
    losses.relative_squared(a, b).backward()
    assert a.grad.tolist() == [[2 * (2.0 - 1.0) / 4.0, 0.0]]


@pytest.mark.parametrize("name", sorted(losses.DISTANCES))
def test_every_distance_is_zero_for_identical_maps_and_positive_otherwise(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)
    d = losses.distance(name)
    assert d(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert d(a, b).item() > 0


def test_unknown_distance_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownName, match="cosine"):
        losses.distance("hamming")


def test_consistency_term_needs_matching_layers() -> None:
    a = {"layer2": torch.ones(2, 3)}
    with pytest.raises(InvalidInput):
        losses.consistency_term(a, {"layer3": torch.ones(2, 3)})


def test_no_attack_is_standard_cross_entropy(model, batch) -> None:
    x, y = batch
    terms = batch_loss(model, x, y, _config(attack="none"), attack=None, layers=LAYERS, dist=losses.relative_squared)
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
    assert torch.equal(terms.total.detach(), expected)
    assert terms.ce_adv.item() == 0.0 and terms.consistency.item() == 0.0


def _adv_like_trainer(model, x, y) -> torch.Tensor:
    """x* as the trainer's attack makes it, from the same RNG state."""
    torch.manual_seed(5)
    return PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)(x, y).adv


def test_lambda_zero_is_exactly_adversarial_training(model, batch) -> None:
    x, y = batch
    config = _config(lam=0.0, alpha=0.7)
    adv = _adv_like_trainer(model, x, y)  # before the train-mode forward updates BN running statistics
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)
    torch.manual_seed(5)
    terms = batch_loss(model, x, y, config, attack=attack, layers=LAYERS, dist=losses.relative_squared)
    with torch.no_grad():
        logits = model(torch.cat([x, adv]))  # the trainer's BN choice: one concatenated train-mode batch
    expected = F.cross_entropy(logits[:6], y) + 0.7 * F.cross_entropy(logits[6:], y)
    assert torch.equal(terms.total.detach(), expected)
    assert terms.consistency.item() == 0.0 and terms.per_layer == {}
    assert not torch.equal(adv, x)  # the attack really moved the images


def test_consistent_loss_adds_lambda_times_the_sum_over_layers(model, batch) -> None:
    x, y = batch
    adv = _adv_like_trainer(model, x, y)
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)
    torch.manual_seed(5)
    terms = batch_loss(model, x, y, _config(lam=2.5), attack=attack, layers=LAYERS, dist=losses.relative_squared)
    net = model.net
    with torch.no_grad():
        h = torch.cat([x, adv])
        h = net.layer1(net.stem((h - model.mean) / model.std))
        a2 = net.layer2(h)
        a3 = net.layer3(a2)
        logits = net.fc(torch.flatten(net.pool(a3), 1))
    d = losses.relative_squared(a2[:6], a2[6:]) + losses.relative_squared(a3[:6], a3[6:])
    expected = F.cross_entropy(logits[:6], y) + F.cross_entropy(logits[6:], y) + 2.5 * d
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.consistency.item() == pytest.approx(d.item(), rel=1e-6)
    assert set(terms.per_layer) == set(LAYERS)
    # the consistency term carries gradient to the weights (hooks kept the graph)
    terms.consistency.backward()
    assert net.layer2.conv1.weight.grad is not None and net.layer2.conv1.weight.grad.abs().sum() > 0


def test_consistency_term_is_zero_when_the_attack_returns_x(model, batch) -> None:
    x, y = batch
    identity = PGD(model, eps=0.0, alpha=0.0, steps=1, random_start=False)
    terms = batch_loss(model, x, y, _config(lam=3.0), attack=identity, layers=LAYERS, dist=losses.relative_squared)
    assert terms.consistency.item() == 0.0
    assert all(v.item() == 0.0 for v in terms.per_layer.values())
    assert torch.equal(terms.ce_clean, terms.ce_adv)
    assert torch.equal(terms.total, terms.ce_clean + terms.ce_adv)


def test_loss_terms_do_not_change_model_mode(model, batch) -> None:
    x, y = batch
    flags = [m.training for m in model.modules()]
    batch_loss(model, x, y, _config(), attack=PGD(model, eps=8 / 255, steps=1), layers=LAYERS,
               dist=losses.relative_squared)
    assert [m.training for m in model.modules()] == flags


def test_config_regimes() -> None:
    assert _config(attack="none").regime == "standard"
    assert _config(lam=0.0).regime == "adversarial"
    assert _config().regime == "consistent"
    assert dataclasses.replace(_config(), loss=LossConfig(consistency_weight=0.1)).regime == "consistent"
