"""Validation of a Probe's AttackSpec against the server's caps: pure functions raising `InvalidInput(field,
problem)` for malformed values and QueueFull (RESOURCE_EXHAUSTED) for valid requests over a work cap, each
message naming the field or the cap. The servicer calls this before anything is queued. What each kind
accepts (norms, default steps, step size, restarts, ensemble members) comes from the attack catalogue."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from conceptlens.handlers.attacks.registry import AttackKind, attack_kind, attack_kinds
from conceptlens.handlers.errors import InvalidInput, QueueFull
from conceptlens.handlers.probe import ProbeSpec
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

from . import validation
from .config import Limits

# The proto's AttackKind values -> the attack catalogue's kinds (the enum value is the kind's `proto_name`).
KINDS = {pb.AttackSpec.AttackKind.Value(k.proto_name): k for k in attack_kinds()}
NORMS = {pb.AttackSpec.NORM_UNSPECIFIED: "linf", pb.AttackSpec.LINF: "linf", pb.AttackSpec.L2: "l2"}
DEFAULT_TOLERANCE = 1 / 255
GHOSTS = 2  # ghost networks of the probed model in a ghost-ensemble probe
CANDIDATES = 8  # coarse grid of the minimal-ε search


def kind_name(spec: pb.AttackSpec) -> str:
    """The registry name of the requested kind, "unknown" when unset (for metric labels)."""
    return KINDS[spec.kind].name if spec.kind in KINDS else "unknown"


def search_rounds(eps_range: tuple[float, float], tolerance: float, candidates: int = CANDIDATES) -> int:
    """Attack calls per image of a minimal-ε search: the coarse grid, the bisection, the two final checks."""
    lattice = max(1, math.floor((eps_range[1] - eps_range[0]) / tolerance + 1e-9))
    grid = min(candidates, lattice + 1)
    gap = max(1, math.ceil(lattice / max(1, grid - 1)))
    return grid + math.ceil(math.log2(gap)) + 2


def work(attack: ProbeSpec, images: int) -> int:
    """Estimated image passes of one probe (forward+backward for gradient attacks, forward for Square):
    images × steps × restarts × ensemble members × search rounds."""
    members = attack.ghosts + len(attack.members) if attack_kind(attack.kind).ensemble else 1
    rounds = 1 if attack.eps_range is None else search_rounds(attack.eps_range, attack.tolerance, attack.candidates)
    return images * attack.steps * attack.restarts * members * rounds


def _budget(value: float, field: str, cap: float, cap_name: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(field, f"must be a finite number >= 0, got {value}")
    if value > cap:
        raise InvalidInput(field, f"{value:.6g} is over the server's cap {cap_name}={cap:.6g}")
    return float(value)


def _count(value: int, field: str, default: int, cap: int, cap_name: str) -> int:
    if value < 0:
        raise InvalidInput(field, f"must be >= 0 (0 = default {default}), got {value}")
    value = value or default
    if value > cap:
        raise QueueFull(f"{field}: {value} is over the server's cap {cap_name}={cap}")
    return value


def attack(spec: pb.AttackSpec, classes: Sequence[str], input_size: int, limits: Limits, images: int,
           member: Callable[[str, int], Any]) -> ProbeSpec:
    """Validate `spec` for a probe of `images` images on a model with `classes`. `member(name, version)` resolves
    an ensemble model (raising UnknownName, NOT_FOUND, for names not served)."""
    if spec.kind not in KINDS:
        raise InvalidInput("attack.kind", f"required; one of {', '.join(k.name for k in KINDS.values())}")
    entry = KINDS[spec.kind]
    kind = entry.name
    if spec.norm not in NORMS:
        raise InvalidInput("attack.norm", f"unknown norm value {spec.norm}; LINF or L2")
    norm = NORMS[spec.norm]
    if norm not in entry.norms:
        l2 = [k.name for k in KINDS.values() if "l2" in k.norms]
        raise InvalidInput("attack.norm", f"{kind} is an L-inf attack; L2 is available for "
                           f"{', '.join(l2[:-1])} and {l2[-1]}")
    cap, cap_name = ((limits.max_probe_epsilon, "max_probe_epsilon") if norm == "linf"
                     else (limits.max_probe_epsilon_l2, "max_probe_epsilon_l2"))
    eps: float | None = None
    eps_range: tuple[float, float] | None = None
    tolerance = DEFAULT_TOLERANCE
    if spec.epsilon_max > 0 or spec.epsilon_min != 0:
        lo = _budget(spec.epsilon_min, "attack.epsilon_min", cap, cap_name)
        hi = _budget(spec.epsilon_max, "attack.epsilon_max", cap, cap_name)
        if not hi > lo:
            raise InvalidInput("attack.epsilon_max", f"must exceed epsilon_min ({lo:.6g}), got {hi:.6g}")
        if spec.tolerance < 0 or not math.isfinite(spec.tolerance):
            raise InvalidInput("attack.tolerance", f"must be > 0 (0 = 1/255), got {spec.tolerance}")
        tolerance = float(spec.tolerance) or DEFAULT_TOLERANCE
        if tolerance > hi - lo:
            raise InvalidInput("attack.tolerance", f"{tolerance:.6g} is wider than the range [{lo:.6g}, {hi:.6g}]")
        eps_range = (lo, hi)
    else:
        eps = _budget(spec.epsilon, "attack.epsilon", cap, cap_name)
        if eps == 0:
            raise InvalidInput("attack.epsilon", "required: a budget > 0, or a range with epsilon_max")
    if entry.black_box:
        steps = _count(spec.steps, "attack.steps", entry.default_steps, limits.max_probe_queries, "max_probe_queries")
    elif entry.single_step:
        if spec.steps > 1:
            raise InvalidInput("attack.steps", f"{entry.proto_name} takes exactly one step, got {spec.steps}")
        steps = 1
    else:
        steps = _count(spec.steps, "attack.steps", entry.default_steps, limits.max_probe_steps, "max_probe_steps")
    restarts = _count(spec.restarts, "attack.restarts", 1, limits.max_probe_restarts, "max_probe_restarts")
    random_start = spec.random_start if spec.HasField("random_start") else True
    if restarts > 1 and (not entry.restarts or eps_range is not None or not random_start):
        raise InvalidInput("attack.restarts", "restarts > 1 apply to PGD at a fixed epsilon with a random start")
    if not math.isfinite(spec.step_size) or spec.step_size < 0:
        raise InvalidInput("attack.step_size", f"must be >= 0 (0 = the attack's default), got {spec.step_size}")
    if spec.step_size and not entry.step_size:
        raise InvalidInput("attack.step_size", f"{kind} has no step size")
    target = validation.target_class(spec.target_class, classes, "attack.target_class")
    members = _members(list(spec.ensemble_models), entry, classes, input_size, limits, member)
    result = ProbeSpec(kind=kind, norm=norm, eps=eps, eps_range=eps_range, tolerance=tolerance, steps=steps,
                         restarts=restarts, step_size=float(spec.step_size) or None, target=target,
                         seed=spec.seed if spec.HasField("seed") else 0, random_start=random_start,
                         members=members, ghosts=GHOSTS, candidates=CANDIDATES)
    cost = work(result, images)
    if cost > limits.max_probe_work:
        raise QueueFull(f"probe work {cost} image passes (images x steps x restarts x members x search rounds) is "
                        f"over the server's cap max_probe_work={limits.max_probe_work}; send fewer images, fewer "
                        "steps or a coarser tolerance")
    return result


def _members(names: list[str], kind: AttackKind, classes: Sequence[str], input_size: int, limits: Limits,
             member: Callable[[str, int], Any]) -> tuple[Any, ...]:
    if not names:
        return ()
    if not kind.ensemble:
        takers = ", ".join(k.proto_name for k in KINDS.values() if k.ensemble)
        raise InvalidInput("attack.ensemble_models", f"only {takers} takes ensemble members, not {kind.name}")
    if len(names) > limits.max_probe_members:
        raise QueueFull(f"attack.ensemble_models: {len(names)} models is over the server's cap "
                        f"max_probe_members={limits.max_probe_members}")
    if len(set(names)) != len(names):
        raise InvalidInput("attack.ensemble_models", "a model is listed twice")
    runtimes = []
    for name in names:
        rt = member(*validation.model_ref(name, 0, "attack.ensemble_models"))  # any name form a request takes
        if list(rt.classes) != list(classes) or rt.input_size != input_size:
            raise InvalidInput("attack.ensemble_models", f"{name!r} does not share the probed model's classes and "
                               "input size")
        runtimes.append(rt)
    return tuple(runtimes)
