"""The attack library, proven correct on a trained ShapesWorld CNN (not just run): budgets, ranges, mode
restoration, monotone success, PGD ≥ FGSM, targets reached, ghost networks, minimal ε, gradient-free Square."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptlens.handlers.attacks import (
    FGSM,
    MIFGSM,
    PGD,
    AttackParams,
    EnsembleAttack,
    GhostNetwork,
    L2Step,
    LinfStep,
    MinimalEpsilon,
    Square,
    attack_class,
    attack_kind,
    build_attack,
    list_attacks,
    make_attack,
)
from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.handlers.zoo import ResidualBlock, build_model
from conceptlens.training.data.shapes import SHAPES_CLASSES

EPS = 16 / 255  # ShapesWorld shapes are bold: this model needs larger budgets than CIFAR models
# Cheap settings per kind so the registry sweep stays fast; a kind added later runs with its defaults.
FAST: dict[str, dict] = {"pgd": {"steps": 5}, "mifgsm": {"steps": 5}, "ghost-ensemble": {"steps": 5},
                         "square": {"n_queries": 40}}


@pytest.fixture(scope="module")
def clean(shapes_model, shapes_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """12 held-out images the model classifies correctly (so success means the attack did it)."""
    images, labels = shapes_batch
    with torch.no_grad():
        ok = shapes_model(images).argmax(1) == labels
    return images[ok][:12], labels[ok][:12]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


# --- every registered attack -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_attacks())
def test_result_inside_ball_and_range_mode_kept(kind: str, shapes_model, clean) -> None:
    images, labels = clean
    state = {k: v.clone() for k, v in shapes_model.state_dict().items()}
    shapes_model.train()
    shapes_model.net.layer1.eval()  # a mixed state must come back exactly as it was
    before = _flags(shapes_model)
    try:
        result = build_attack(kind, shapes_model, eps=EPS, **FAST.get(kind, {}))(images, labels)
        assert _flags(shapes_model) == before
    finally:
        shapes_model.eval()
    n = images.shape[0]
    assert result.adv.shape == images.shape and result.logits.shape == (n, len(SHAPES_CLASSES))
    assert result.success.shape == (n,) and result.success.dtype == torch.bool
    assert torch.allclose(result.eps, torch.full((n,), EPS))
    assert (result.adv - images).abs().max() <= EPS + 1e-6
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    assert torch.equal(result.success, result.logits.argmax(1) != labels)
    if kind != "square":  # 40 queries are too few to expect a success; test_square_* checks that
        assert result.success.any(), f"{kind} at ε=16/255 fooled nothing"
    # Eval mode during the attack: BatchNorm statistics untouched.
    assert all(torch.equal(v, state[k]) for k, v in shapes_model.state_dict().items())
    assert _hooks(shapes_model) == 0


class FailsAfter(nn.Module):
    """Wraps a model and raises on its `n`-th forward pass: an attack interrupted mid-way."""

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("model failed mid-attack")
        return self.model(x)


@pytest.mark.parametrize("kind", list_attacks())
def test_mode_restored_when_model_raises(kind: str) -> None:
    model = FailsAfter(build_model("small_cnn", SHAPES_CLASSES, input_size=16), n=2)
    model.train()
    model.model.net.layer2.eval()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="mid-attack"):
        build_attack(kind, model, eps=EPS, **FAST.get(kind, {}))(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    assert _flags(model) == before
    assert _hooks(model) == 0


def test_lazy_result_judges_on_first_access(shapes_model, clean) -> None:
    images, labels = clean
    calls = []
    handle = shapes_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        eager = PGD(shapes_model, eps=EPS, steps=2, seed=0)(images, labels)
        assert len(calls) == 3  # two steps + the judging pass
        atk = PGD(shapes_model, eps=EPS, steps=2, seed=0)
        atk.lazy = True
        lazy = atk(images, labels)
        assert len(calls) == 5  # two steps, no judging yet
        shapes_model.train()
        assert torch.equal(lazy.success, eager.success) and torch.allclose(lazy.logits, eager.logits)
        assert len(calls) == 6 and shapes_model.training  # judged once, in eval mode, mode restored
    finally:
        handle.remove()
        shapes_model.eval()


def test_pgd_l2_stays_in_l2_ball(shapes_model, clean) -> None:
    images, labels = clean
    result = PGD(shapes_model, eps=0.5, steps=5, norm="l2", seed=0)(images, labels)
    assert (result.adv - images).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert result.adv.min() >= 0 and result.adv.max() <= 1 and result.success.any()


def test_l2_step_is_a_true_normalised_step() -> None:
    x, grad = torch.rand(3, 3, 8, 8), torch.randn(3, 3, 8, 8) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1, 1)
    alpha = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    moved = L2Step(torch.ones(3, 1, 1, 1), alpha).step(x, grad) - x
    assert torch.allclose(moved.flatten(1).norm(dim=1), alpha.flatten(), rtol=1e-5)
    # the direction is the gradient's, whatever its scale
    assert torch.allclose(F.cosine_similarity(moved.flatten(1), grad.flatten(1)), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("step_cls", [LinfStep, L2Step])
def test_projection_and_random_start_stay_in_ball_per_sample(step_cls) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen)
    eps = torch.tensor([0.0, 0.01, 0.1, 2.0]).view(4, 1, 1, 1)  # one budget per sample, 0 included
    step = step_cls(eps, eps / 2)

    def dist(d: torch.Tensor) -> torch.Tensor:
        flat = d.flatten(1)
        return flat.abs().amax(1) if step_cls is LinfStep else flat.norm(dim=1)

    for x in (x0 + torch.randn(4, 3, 8, 8, generator=gen) * 3, step.random_perturb(x0, gen)):
        projected = step.project(x, x0)
        assert (dist(projected - x0) <= eps.flatten() + 1e-6).all()
        assert projected.min() >= 0 and projected.max() <= 1
    inside = step.project(x0 + (step.project(x0 + 0.001, x0) - x0) * 0.5, x0)  # a point already inside stays put
    assert torch.allclose(step.project(inside, x0), inside)


# --- attacks are correct, not just running ---------------------------------------------------------------


@pytest.mark.parametrize("cls", [PGD, MIFGSM])
@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_success_rate_grows_with_eps(cls, shapes_model, clean) -> None:
    images, labels = clean
    rates = [cls(shapes_model, eps=e, steps=5)(images, labels).success.float().mean().item()
             for e in (0.0, 4 / 255, 8 / 255, 16 / 255, 32 / 255)]
    assert rates[0] == 0.0  # ε = 0 changes nothing on correctly classified images
    assert all(b >= a - 1 / len(labels) for a, b in itertools.pairwise(rates)), rates
    assert rates[-1] >= 0.9 and rates[-1] > rates[1], rates


def test_pgd_reaches_at_least_fgsm_loss(shapes_model, clean) -> None:
    images, labels = clean
    eps = 4 / 255
    losses = {}
    for name, atk in (("fgsm", FGSM(shapes_model, eps=eps)), ("pgd", PGD(shapes_model, eps=eps, steps=10, seed=0))):
        losses[name] = F.cross_entropy(atk(images, labels).logits, labels, reduction="none")
    assert losses["pgd"].mean() >= losses["fgsm"].mean(), losses
    assert (losses["pgd"] >= losses["fgsm"] - 1e-3).float().mean() >= 0.75


def test_restarts_keep_the_best_result_per_sample(shapes_model, clean) -> None:
    images, labels = clean
    eps = 4 / 255  # small enough that restarts matter
    one = PGD(shapes_model, eps=eps, steps=3, seed=5)(images, labels)
    best = PGD(shapes_model, eps=eps, steps=3, restarts=4, seed=5)(images, labels)  # first restart == `one`
    assert (best.success | ~one.success).all()  # never loses a success
    same = best.success == one.success
    loss_one = F.cross_entropy(one.logits, labels, reduction="none")
    loss_best = F.cross_entropy(best.logits, labels, reduction="none")
    assert (loss_best[same] >= loss_one[same] - 1e-5).all()


@pytest.mark.parametrize("kind", ["pgd", "mifgsm", "ghost-ensemble"])
@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_targeted_attack_reaches_target(kind: str, shapes_model, clean) -> None:
    images, labels = clean
    target = (labels + 1) % len(SHAPES_CLASSES)
    result = build_attack(kind, shapes_model, eps=32 / 255, steps=10, targeted=True)(images, labels, target=target)
    assert torch.equal(result.success, result.logits.argmax(1) == target)
    assert result.success.float().mean() >= 0.9


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_ensemble_attack_fools_every_member(shapes_model, shapes_model_b, clean) -> None:
    images, labels = clean
    atk = EnsembleAttack([shapes_model, shapes_model_b], weights=[1, 1], eps=32 / 255, steps=10)
    result = atk(images, labels)
    assert (result.adv - images).abs().max() <= 32 / 255 + 1e-6
    with torch.no_grad():
        ensemble = (shapes_model(result.adv) + shapes_model_b(result.adv)) / 2
        assert torch.allclose(result.logits, ensemble, atol=1e-4)  # judged on the weighted mean logits
        for model in (shapes_model, shapes_model_b):
            assert (model(result.adv).argmax(1) != labels).float().mean() >= 0.8


# --- ghost networks --------------------------------------------------------------------------------------


def test_ghost_changes_logits_keeps_argmax_leaves_no_hooks(shapes_model, clean) -> None:
    images, _ = clean
    with torch.no_grad():
        base = shapes_model(images)
        for ghost in (GhostNetwork(shapes_model, 0.2, seed=0), GhostNetwork(shapes_model, 0.0, dropout_keep=0.95)):
            first, second = ghost(images), ghost(images)
            assert (first - base).abs().max() > 1e-3  # eroded
            assert (first - second).abs().max() > 1e-4  # redrawn at every forward pass
            assert (first.argmax(1) == base.argmax(1)).float().mean() >= 0.75
    assert _hooks(shapes_model) == 0
    assert torch.equal(shapes_model(images), base)  # the model itself is untouched


def test_skip_erosion_scales_the_identity_exactly() -> None:
    block = ResidualBlock(4, 4, stride=1).eval()
    for p in block.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 4, 6, 6)
    ghost = GhostNetwork(block, skip_erosion=0.2, seed=7)
    with torch.no_grad():
        eroded = ghost(x)
        lam = 0.8 + 0.4 * torch.rand((1, 4, 1, 1), generator=torch.Generator().manual_seed(7))
        residual = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(eroded, torch.relu(residual + lam * x), atol=1e-5)
    assert _hooks(block) == 0


def test_ghost_hooks_removed_when_forward_raises(shapes_model) -> None:
    failing = shapes_model.net.layer3.conv2.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyError("x")))
    try:
        with pytest.raises(KeyError):
            GhostNetwork(shapes_model, 0.2, dropout_keep=0.9)(torch.rand(1, 3, 32, 32))
    finally:
        failing.remove()
    assert _hooks(shapes_model) == 0


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_ghost_network_of_a_torchvision_resnet() -> None:
    for arch, blocks in (("resnet18", 8), ("resnet50", 16)):
        model = build_model(arch, ["a", "b"], input_size=32).eval()
        ghost = GhostNetwork(model, 0.2)
        assert len(ghost.blocks) == blocks
        with torch.no_grad():
            x = torch.rand(1, 3, 32, 32)
            assert not torch.allclose(ghost(x), model(x))
        assert _hooks(model) == 0
    # gradients flow through the hooks and torchvision's in-place `out += identity`
    model = build_model("resnet18", ["a", "b"], input_size=32)
    x = torch.rand(2, 3, 32, 32)
    moved = (attack_class("ghost-ensemble")(model, eps=EPS, steps=1)(x, torch.tensor([0, 1])).adv - x).abs()
    assert 0 < moved.max() <= EPS + 1e-6 and _hooks(model) == 0


# --- minimal ε -------------------------------------------------------------------------------------------


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_minimal_eps_flips_at_eps_not_below(shapes_model, clean) -> None:
    images, labels = clean[0][:8], clean[1][:8]
    tol = 1 / 255

    def factory(eps):
        return PGD(shapes_model, eps=eps, alpha=eps / 4, steps=5, random_start=False)

    result = MinimalEpsilon(factory, eps_range=(0.0, 32 / 255), tol=tol, candidates=5)(images, labels)
    assert result.success.sum() >= 6
    found = result.success
    eps = result.eps[found]
    assert torch.isinf(result.eps[~found]).all()
    assert (eps > 0).all()  # the images are classified correctly at ε = 0
    x, y = images[found], labels[found]
    assert factory(eps)(x, y).success.all()
    assert not factory(eps - tol)(x, y).success.any()
    assert torch.allclose(result.adv[found], factory(eps)(x, y).adv)
    assert (result.adv - images).abs().flatten(1).amax(1)[found].le(eps + 1e-6).all()


def test_minimal_eps_bad_arguments() -> None:
    def f(eps):
        return PGD(nn.Identity(), eps=eps)

    for kwargs, field in (({"eps_range": (0.1, 0.05)}, "eps_range"), ({"tol": 0}, "tol"),
                          ({"candidates": 1}, "candidates"), ({"eps_range": (-1, 0.1)}, "eps_range")):
        with pytest.raises(InvalidInput, match=field):
            MinimalEpsilon(f, **kwargs)


# --- Square: black-box --------------------------------------------------------------------------------------


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no gradients from this model")


class GradientFree(nn.Module):
    """A model that answers queries but whose backward pass raises: only a black-box attack can work."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoBackward.apply(self.model(x))


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_square_succeeds_without_gradients(shapes_model, clean) -> None:
    images, labels = clean
    blackbox = GradientFree(shapes_model)
    with pytest.raises(RuntimeError, match="no gradients"):
        PGD(blackbox, eps=EPS, steps=1)(images, labels)  # the wrapper really blocks gradient attacks
    eps = 32 / 255  # random search needs a larger budget than PGD (100% at this ε) on this model
    result = Square(blackbox, eps=eps, n_queries=400, p_init=0.3, seed=0)(images, labels)
    assert (result.adv - images).abs().max() <= eps + 1e-6
    assert result.success.float().mean() >= 0.5


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_square_takes_a_plain_function_and_is_reproducible(shapes_model, clean) -> None:
    images, labels = clean
    first = Square(shapes_model, eps=EPS, n_queries=20, seed=3)(images, labels)
    again = Square(lambda x: shapes_model(x), eps=EPS, n_queries=20, seed=3)(images, labels)
    assert torch.equal(again.adv, first.adv)


# --- bad input ------------------------------------------------------------------------------------------


def _bad_calls():
    model = build_model("small_cnn", SHAPES_CLASSES, input_size=16)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    return [
        ("images", lambda: PGD(model)(x[0], y)),
        ("images", lambda: PGD(model)(x[:, :1], y)),
        ("images", lambda: FGSM(model)(x * 2, y)),
        ("images", lambda: FGSM(model)(x - 1, y)),
        ("labels", lambda: PGD(model)(x, y[:1])),
        ("labels", lambda: PGD(model)(x, y.float())),
        ("target", lambda: PGD(model, targeted=True)(x, y)),
        ("target", lambda: PGD(model, targeted=True)(x, y, target=torch.tensor([1]))),
        ("eps", lambda: PGD(model, eps=-0.1)),
        ("eps", lambda: MIFGSM(model, eps=float("nan"))),
        ("steps", lambda: PGD(model, steps=0)),
        ("steps", lambda: MIFGSM(model, steps=2.5)),
        ("restarts", lambda: PGD(model, restarts=2, random_start=False)),
        ("n_queries", lambda: Square(model, n_queries=0)),
        ("weights", lambda: EnsembleAttack([model, model], weights=[1.0])),
        ("skip_erosion", lambda: GhostNetwork(model, skip_erosion=1.5)),
        ("eps", lambda: PGD(model, eps=torch.full((3,), 0.1))(x, y)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_field(index: int) -> None:
    field, call = _bad_calls()[index]
    with pytest.raises(InvalidInput, match=f"^{field}:") as err:
        call()
    assert isinstance(err.value, ValueError) and err.value.field == field


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownName, match="fgsm, ghost-ensemble, mifgsm, pgd, square"):
        attack_class("cw")
    with pytest.raises(UnknownName, match="l2, linf"):
        PGD(nn.Identity(), norm="l1")


# --- the catalogue ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_attacks())
def test_catalogue_builds_every_kind_from_shared_params(kind: str, shapes_model, clean) -> None:
    images, labels = clean
    entry = attack_kind(kind)
    atk = make_attack(kind, shapes_model, AttackParams(eps=EPS, steps=2, seed=0))
    assert isinstance(atk, entry.cls) and atk.eps == EPS
    assert getattr(atk, "n_queries", getattr(atk, "steps", 1)) == (1 if entry.single_step else 2)
    result = atk(images[:2], labels[:2])
    assert (result.adv - images[:2]).abs().max() <= EPS + 1e-6
    default = make_attack(kind, shapes_model, AttackParams(eps=EPS))  # unset steps: the registered default
    assert getattr(default, "n_queries", getattr(default, "steps", 1)) == entry.default_steps
    if "l2" not in entry.norms:
        with pytest.raises(InvalidInput, match=r"^norm:"):
            make_attack(kind, shapes_model, AttackParams(eps=EPS, norm="l2"))


def test_catalogue_deterministic_params_make_batch_independent_attacks(shapes_model, clean) -> None:
    images, labels = clean
    params = AttackParams(eps=EPS, steps=20, seed=3, deterministic=True)
    pgd = make_attack("pgd", shapes_model, params)
    assert pgd.random_start is False
    square = make_attack("square", shapes_model, params)
    batch = square(images[:3], labels[:3]).adv
    alone = make_attack("square", shapes_model, params)(images[1:2], labels[1:2]).adv
    assert torch.equal(batch[1:2], alone)  # an image's squares do not depend on its batch


def test_ghost_ensemble_others_join_the_ghosts_with_equal_weight(shapes_model, shapes_model_b) -> None:
    atk = make_attack("ghost-ensemble", shapes_model, AttackParams(ghosts=2, others=(shapes_model_b,)))
    assert len(atk.source.members) == 3 and atk.source.weights == pytest.approx([1 / 3] * 3)
    assert atk.source.members[2] is shapes_model_b and atk.model is shapes_model  # judged on the attacked model
