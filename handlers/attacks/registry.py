"""Attack kinds by name (the proto's attack kind, the CLI's --attack) -> class. No `eval`, no `__dict__` lookups.

Every registered class is built as `cls(model, eps=..., **options)` and called as `atk(images, labels, target)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from ..errors import UnknownName
from .base import Attack
from .fgsm import FGSM
from .ghost import GhostEnsemble
from .mifgsm import MIFGSM
from .pgd import PGD
from .square import Square

_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator / function: register an attack class under `name` (warns when a name is reused)."""

    def decorate(cls: type[Attack]) -> type[Attack]:
        if name in _ATTACKS and _ATTACKS[name] is not cls:
            warnings.warn(f"attack {name!r} registered twice; the later one wins", stacklevel=2)
        _ATTACKS[name] = cls
        return cls

    return decorate


for _name, _cls in (("fgsm", FGSM), ("pgd", PGD), ("mifgsm", MIFGSM), ("ghost-ensemble", GhostEnsemble),
                    ("square", Square)):
    register_attack(_name)(_cls)


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def attack_class(kind: str) -> type[Attack]:
    """The class registered as `kind`; an unknown kind raises UnknownName listing the valid ones."""
    if kind not in _ATTACKS:
        raise UnknownName("attack", kind, _ATTACKS)
    return _ATTACKS[kind]


def build_attack(kind: str, model: Callable, **options: object) -> Attack:
    """`attack_class(kind)(model, **options)`, e.g. `build_attack("pgd", model, eps=4/255, steps=20)`."""
    return attack_class(kind)(model, **options)
