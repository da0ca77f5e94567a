"""The attack library: small attack classes over one shared loop, all called as `atk(images, labels, target)`.

See docs/design.md §5. Every attack works on [0,1] images (normalisation lives in the model wrapper), keeps the
model's training flags intact, and returns an `AttackResult` (adv, success, eps, logits).
"""

from .base import Attack, AttackParams, AttackResult
from .ensemble import EnsembleAttack, LogitEnsemble
from .fgsm import FGSM
from .ghost import GhostEnsemble, GhostNetwork
from .loop import Momentum, iterate
from .mifgsm import MIFGSM
from .minimal_eps import MinimalEpsilon
from .pgd import PGD
from .registry import (
    AttackKind,
    attack_class,
    attack_kind,
    attack_kinds,
    build_attack,
    list_attacks,
    make_attack,
    register_attack,
)
from .square import Square
from .steps import L2Step, LinfStep

__all__ = [
    "FGSM", "MIFGSM", "PGD", "Attack", "AttackKind", "AttackParams", "AttackResult", "EnsembleAttack", "GhostEnsemble",
    "GhostNetwork", "L2Step", "LinfStep", "LogitEnsemble", "MinimalEpsilon", "Momentum", "Square", "attack_class",
    "attack_kind", "attack_kinds", "build_attack", "iterate", "list_attacks", "make_attack", "register_attack",
]
