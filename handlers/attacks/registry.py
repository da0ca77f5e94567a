"""The attack catalogue: every attack kind registered once, with its class, default steps, allowed norms and
what callers must know of it. The trainer, probes, dissection, evaluation, the server's request validation
and its proto mapping all read this table; nothing else spells a list of kinds.

Adding an attack is one file (a class with `from_params`) plus one `register_attack(AttackKind(...))` line
below. No `eval`, no `__dict__` lookups.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import InvalidInput, UnknownName
from .base import Attack, AttackParams
from .fgsm import FGSM
from .ghost import GhostEnsemble
from .mifgsm import MIFGSM
from .pgd import PGD
from .square import Square


@dataclass(frozen=True)
class AttackKind:
    """One registered kind. `name` is the CLI's and the config's spelling; the proto's enum value is
    `proto_name` (upper case, `-` as `_`)."""

    name: str
    cls: type[Attack]
    default_steps: int  # iterations; for a black-box kind, queries per image
    norms: tuple[str, ...] = ("linf", "l2")
    black_box: bool = False  # queries logits only (no gradient, no torch model needed); steps count queries
    single_step: bool = False  # exactly one step: a request for more is an error
    step_size: bool = True  # takes a step size
    restarts: bool = False  # takes random restarts
    ensemble: bool = False  # takes other models (`AttackParams.others`) beside the attacked one

    @property
    def proto_name(self) -> str:
        return self.name.upper().replace("-", "_")

    def build(self, model: Callable, params: AttackParams) -> Attack:
        """The attack for `params` on `model` (a torch model, or a logits function for a black-box kind)."""
        if params.norm not in self.norms:
            raise InvalidInput("norm", f"{self.name} supports {' and '.join(self.norms)}, not {params.norm}")
        return self.cls.from_params(model, replace(params, steps=params.steps or self.default_steps))


_KINDS: dict[str, AttackKind] = {}


def register_attack(kind: AttackKind) -> AttackKind:
    """Add `kind` to the catalogue (warns when a name is reused; the later one wins)."""
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        warnings.warn(f"attack {kind.name!r} registered twice; the later one wins", stacklevel=2)
    _KINDS[kind.name] = kind
    return kind


register_attack(AttackKind("fgsm", FGSM, default_steps=1, single_step=True, step_size=False))
register_attack(AttackKind("pgd", PGD, default_steps=10, restarts=True))
register_attack(AttackKind("mifgsm", MIFGSM, default_steps=10))
register_attack(AttackKind("ghost-ensemble", GhostEnsemble, default_steps=10, norms=("linf",), ensemble=True))
register_attack(AttackKind("square", Square, default_steps=500, norms=("linf",), black_box=True, step_size=False))


def attack_kinds() -> tuple[AttackKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def list_attacks() -> list[str]:
    return sorted(_KINDS)


def attack_kind(name: str) -> AttackKind:
    """The kind registered as `name`; an unknown name raises UnknownName listing the valid ones."""
    if name not in _KINDS:
        raise UnknownName("attack", name, _KINDS)
    return _KINDS[name]


def attack_class(name: str) -> type[Attack]:
    return attack_kind(name).cls


def make_attack(name: str, model: Callable, params: AttackParams) -> Attack:
    """The attack of kind `name` built from shared parameters, e.g.
    `make_attack("pgd", model, AttackParams(eps=8/255, steps=20))`; unset steps take the kind's default."""
    return attack_kind(name).build(model, params)


def build_attack(name: str, model: Callable, **options: object) -> Attack:
    """`attack_class(name)(model, **options)` with the class's own keywords, e.g.
    `build_attack("square", predict, eps=4/255, n_queries=200)`."""
    return attack_kind(name).cls(model, **options)
