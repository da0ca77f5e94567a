"""The attack library: small attack classes over one shared loop, all called as `atk(images, labels, target)`.

See design.md §5. Every attack works on [0,1] images (normalisation lives in the model wrapper), keeps the
model's training flags intact, and returns an `AttackResult` (adv, success, eps, logits).
"""

from .base import Attack, AttackResult
from .ensemble import EnsembleAttack, LogitEnsemble
from .fgsm import FGSM
from .ghost import GhostEnsemble, GhostNetwork
from .loop import Momentum, iterate
from .mifgsm import MIFGSM
from .minimal_eps import MinimalEpsilon
from .pgd import PGD
from .registry import attack_class, build_attack, list_attacks, register_attack
from .square import Square
from .steps import L2Step, LinfStep

__all__ = [
    "FGSM", "MIFGSM", "PGD", "Attack", "AttackResult", "EnsembleAttack", "GhostEnsemble", "GhostNetwork", "L2Step",
    "LinfStep", "LogitEnsemble", "MinimalEpsilon", "Momentum", "Square", "attack_class", "build_attack", "iterate",
    "list_attacks", "register_attack",
]
