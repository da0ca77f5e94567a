"""AttackSpec validation without a server, and the work estimate behind the max_probe_work cap checked against
the attack calls a real minimal-ε search makes on the trained ShapesWorld CNN."""

from __future__ import annotations

import pytest
import torch

from conceptlens.handlers.attacks import PGD, MinimalEpsilon
from conceptlens.handlers.errors import InvalidInput, QueueFull
from conceptlens.server import probe_validation as pv
from conceptlens.server.config import Limits
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

CLASSES = ["a", "b", "c"]


def _resolve(name: str):
    raise AssertionError(f"no member lookups expected, got {name}")


def _attack(limits: Limits | None = None, images: int = 1, **fields) -> object:
    return pv.attack(pb.AttackSpec(**fields), CLASSES, 32, limits or Limits(), images, _resolve)


def test_defaults_fill_in_and_fixed_and_range_modes_are_exclusive():
    a = _attack(kind=pb.AttackSpec.PGD, epsilon=0.03)
    assert (a.kind, a.norm, a.steps, a.restarts, a.seed, a.random_start, a.eps_range) == \
        ("pgd", "linf", 10, 1, 0, True, None)
    r = _attack(kind=pb.AttackSpec.MIFGSM, epsilon=0.03, epsilon_max=0.1, seed=7)
    assert r.eps is None and r.eps_range == pytest.approx((0.0, 0.1)) and r.tolerance == pytest.approx(1 / 255)
    assert r.seed == 7
    assert _attack(kind=pb.AttackSpec.SQUARE, epsilon=0.03).steps == 500


@pytest.mark.parametrize(("fields", "error", "text"), [
    ({}, InvalidInput, "attack.kind"),
    ({"kind": pb.AttackSpec.PGD, "epsilon": -0.1}, InvalidInput, "attack.epsilon"),
    ({"kind": pb.AttackSpec.PGD, "epsilon_min": 0.1, "epsilon_max": 0.05}, InvalidInput, "must exceed"),
    ({"kind": pb.AttackSpec.PGD, "epsilon_max": 0.05, "tolerance": 0.1}, InvalidInput, "wider than the range"),
    ({"kind": pb.AttackSpec.PGD, "epsilon_max": 0.05, "restarts": 2}, InvalidInput, "attack.restarts"),
    ({"kind": pb.AttackSpec.FGSM, "epsilon": 0.05, "steps": 3}, InvalidInput, "exactly one step"),
    ({"kind": pb.AttackSpec.PGD, "epsilon": 0.05, "step_size": -1}, InvalidInput, "attack.step_size"),
    ({"kind": pb.AttackSpec.PGD, "epsilon": 0.05, "norm": pb.AttackSpec.L2, "steps": 300}, QueueFull,
     "max_probe_steps=200"),
    ({"kind": pb.AttackSpec.PGD, "epsilon": 70.0, "norm": pb.AttackSpec.L2}, InvalidInput, "max_probe_epsilon_l2"),
])
def test_bad_specs_name_the_field_or_cap(fields, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(")):
        _attack(**fields)


def test_work_cap_counts_images_steps_and_search_rounds():
    limits = Limits(max_probe_work=1000)
    _attack(limits, images=10, kind=pb.AttackSpec.PGD, epsilon=0.03, steps=100)  # 1000: at the cap
    with pytest.raises(QueueFull, match="max_probe_work=1000"):
        _attack(limits, images=11, kind=pb.AttackSpec.PGD, epsilon=0.03, steps=100)
    with pytest.raises(QueueFull, match="max_probe_work=1000"):  # a search multiplies by its rounds
        _attack(limits, images=10, kind=pb.AttackSpec.PGD, epsilon_max=0.1, steps=10)


def test_search_rounds_bound_the_attack_calls_of_a_real_search(shapes_model, shapes_batch):
    x = shapes_batch[0][:6]
    with torch.no_grad():
        labels = shapes_model(x).argmax(1)
    calls = []

    def factory(eps):
        calls.append(eps.numel())
        return PGD(shapes_model, eps=eps, steps=3, random_start=False)

    lo, hi, tol = 0.0, 16 / 255, 1 / 255
    MinimalEpsilon(factory, (lo, hi), tol, pv.CANDIDATES)(x, labels)
    passes_per_image = sum(calls) / len(x)  # each call attacks `numel` images
    assert len(calls) <= pv.search_rounds((lo, hi), tol)
    assert passes_per_image <= pv.search_rounds((lo, hi), tol)


def test_proto_attack_kinds_are_the_catalogue():
    """Every AttackKind of the proto but UNSPECIFIED is a catalogue kind and back: the server reads the catalogue."""
    from conceptlens.handlers.attacks import attack_kinds

    proto = set(pb.AttackSpec.AttackKind.keys()) - {"ATTACK_KIND_UNSPECIFIED"}
    assert proto == {k.proto_name for k in attack_kinds()}
    for value, kind in pv.KINDS.items():
        assert pb.AttackSpec.AttackKind.Name(value) == kind.proto_name
        spec = pb.AttackSpec(kind=value, epsilon=0.03)
        assert pv.kind_name(spec) == kind.name and _attack(kind=value, epsilon=0.03).steps == kind.default_steps
