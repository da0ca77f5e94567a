"""The training configuration: frozen dataclasses read from TOML, overridden from the command line, validated
before any work starts.

A TOML file has one table per section (`[model]`, `[data]`, `[optim]`, `[attack]`, `[loss]`, `[run]`,
`[eval]`); every key is optional and defaults to the values below. Overrides use the same dotted names:
`--set loss.consistency_weight=0.5 --set attack.name=none`. Values are parsed as TOML literals, so strings may
be given bare (`attack.name=pgd`) and lists as `model.layers=["layer2","layer3"]`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptlens.handlers.errors import InvalidInput, UnknownName

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
NORMS = ("linf", "l2")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "small_cnn"
    input_size: int = 64
    mean: tuple[float, ...] = ()  # empty: the zoo's default (ImageNet statistics)
    std: tuple[float, ...] = ()
    init_weights: str = ""  # start from these weights: a run or bundle directory, or a state-dict file
    replace_head: bool = False  # with init_weights of another class count: a fresh head for the data's classes


@dataclass(frozen=True)
class DataConfig:
    train: str = "shapes:4000"  # a registry spec: shapes[:N], broden:PATH, imagefolder:PATH, cifar10:PATH
    val: str = ""  # empty: the same spec's "val" split
    batch_size: int = 64
    num_workers: int = 0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    step_size: int = 5  # epochs between decays ("step" schedule)
    gamma: float = 0.1  # decay factor ("step" schedule)
    warmup_fraction: float = 0.2  # share of steps spent warming up ("onecycle" schedule)


@dataclass(frozen=True)
class AttackConfig:
    """How x* is made during training. The attack is always the library's (`conceptlens.handlers.attacks`)."""

    name: str = "pgd"  # "none" is standard training
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 5
    norm: str = "linf"
    random_start: bool = True
    ghost_members: int = 2  # ghost-ensemble only: ghost networks averaged per step


@dataclass(frozen=True)
class LossConfig:
    """Loss = CE(f(x), y) + adv_weight·CE(f(x*), y) + consistency_weight·Σ_l D(φ_l(x), φ_l(x*))."""

    adv_weight: float = 1.0  # α
    consistency_weight: float = 1.0  # λ; 0 is plain adversarial training
    distance: str = "relative"  # see losses.DISTANCES
    layers: tuple[str, ...] = ()  # empty: the architecture's default traced layers
    # CSG regime (training/csg.py): weight of the class-specific gate's sparsity loss; 0 = no gate
    csg_weight: float = 0.0
    csg_sparsity: float = 0.2  # s: the open fraction of the gate the hinge allows (Liang et al.)
    csg_layer: str = ""  # empty: the last default traced layer


@dataclass(frozen=True)
class RunConfig:
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # only takes effect on CUDA
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: only at the end of each epoch
    log_every: int = 1  # steps between metrics.jsonl records
    progress: bool = True  # tqdm bars (rank 0 only)


@dataclass(frozen=True)
class EvalConfig:
    """The per-epoch validation: clean accuracy on all of it, robust accuracy under PGD-k on a prefix."""

    robust_n: int = 256  # images attacked per epoch (0: skip robust accuracy)
    steps: int = 10
    eps: float = -1.0  # negative: the training attack's ε
    batch_size: int = 256


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def regime(self) -> str:
        """"standard", "adversarial" (λ = 0) or "consistent": the three baselines of one trainer."""
        if self.attack.name == "none":
            return "standard"
        return "adversarial" if self.loss.consistency_weight == 0 else "consistent"

    @property
    def eval_eps(self) -> float:
        return self.attack.eps if self.eval.eps < 0 else self.eval.eps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from nested mappings; unknown sections or keys are errors that list the valid ones."""
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise UnknownName(f"{source} section", name, _SECTIONS)
        if not isinstance(values, Mapping):
            raise InvalidInput(f"{source}.{name}", "must be a table of keys")
        sections[name] = _build_section(name, values, source)
    return TrainConfig(**sections)


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML file (or start from the defaults) and apply `section.key=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput("config", f"no such file: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise InvalidInput("config", f"{path}: {err}") from None
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, source=str(path) if path else "config")


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is a TOML literal or else a bare string."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise InvalidInput("--set", f"expected section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def validate(config: TrainConfig) -> None:
    """Check every name and number that can be checked without data; raise on the first problem.

    Architecture and layers are checked against the zoo; the dataset spec is checked when it is opened
    (`trainer.open_data`), which also happens before any training step.
    """
    from conceptlens.handlers import zoo

    from .losses import DISTANCES

    zoo.arch_spec(config.model.arch)
    _choice("optimizer", config.optim.name, OPTIMIZERS)
    _choice("schedule", config.optim.schedule, SCHEDULES)
    _choice("attack", config.attack.name, training_attacks())
    _choice("attack norm", config.attack.norm, NORMS)
    if config.attack.name != "none":
        from conceptlens.handlers.attacks.registry import attack_kind

        if config.attack.norm not in attack_kind(config.attack.name).norms:
            raise InvalidInput("attack.norm", f"{config.attack.name} supports only "
                               f"{', '.join(attack_kind(config.attack.name).norms)}")
    _choice("distance", config.loss.distance, DISTANCES)
    _choice("device", config.run.device, DEVICES)
    for name, value in [
        ("model.input_size", config.model.input_size), ("data.batch_size", config.data.batch_size),
        ("run.epochs", config.run.epochs), ("run.log_every", config.run.log_every),
        ("eval.batch_size", config.eval.batch_size), ("attack.ghost_members", config.attack.ghost_members),
    ]:
        if value < 1:
            raise InvalidInput(name, f"must be >= 1, got {value}")
    for name, value in [
        ("optim.lr", config.optim.lr), ("optim.weight_decay", config.optim.weight_decay),
        ("loss.adv_weight", config.loss.adv_weight), ("loss.consistency_weight", config.loss.consistency_weight),
        ("attack.eps", config.attack.eps), ("attack.step_size", config.attack.step_size),
        ("data.num_workers", config.data.num_workers), ("run.checkpoint_every", config.run.checkpoint_every),
        ("eval.robust_n", config.eval.robust_n), ("eval.steps", config.eval.steps),
    ]:
        if value < 0:
            raise InvalidInput(name, f"must be >= 0, got {value}")
    if config.loss.csg_weight < 0 or not 0 < config.loss.csg_sparsity <= 1:
        raise InvalidInput("loss.csg_weight/csg_sparsity", "need csg_weight >= 0 and 0 < csg_sparsity <= 1")
    if config.attack.name != "none" and config.attack.steps < 1:
        raise InvalidInput("attack.steps", f"must be >= 1, got {config.attack.steps}")
    if len(config.model.mean) != len(config.model.std) or len(config.model.mean) not in (0, 3):
        raise InvalidInput("model.mean/std", "give both with 3 values each, or neither")
    if config.optim.schedule == "onecycle" and not 0 < config.optim.warmup_fraction < 1:
        raise InvalidInput("optim.warmup_fraction", f"must be in (0, 1), got {config.optim.warmup_fraction}")
    if config.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidInput("run.device", "cuda requested but no CUDA device is available")
    if config.regime == "consistent" or config.loss.layers:
        model = zoo.build_model(config.model.arch, ["a", "b"], input_size=config.model.input_size)
        for layer in traced_layers(config):
            zoo.resolve_layer(model, layer)


def training_attacks() -> tuple[str, ...]:
    """`attack.name` values: "none" (standard training) and the attack catalogue's gradient attacks. A function,
    not a constant, because the catalogue imports torch and this module does not."""
    from conceptlens.handlers.attacks.registry import attack_kinds

    return ("none", *(k.name for k in attack_kinds() if not k.black_box))


def traced_layers(config: TrainConfig) -> tuple[str, ...]:
    """The layers the consistency term compares: the configured ones, else the architecture's defaults."""
    from conceptlens.handlers import zoo

    return config.loss.layers or zoo.arch_spec(config.model.arch).default_layers


def parse_number(where: str, text: str) -> float:
    """A float written plainly or as a fraction ("8/255", how ε is usually quoted)."""
    num, slash, den = text.partition("/")
    try:
        return float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise InvalidInput(where, f"expected a number or a fraction like 8/255, got {text!r}") from None


def _choice(kind: str, name: str, valid: Iterable[str]) -> None:
    if name not in valid:
        raise UnknownName(kind, name, valid)


def _build_section(name: str, values: Mapping[str, Any], source: str) -> Any:
    cls = _SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UnknownName(f"{source} key in [{name}]", key, fields)
        kwargs[key] = _coerce(f"{name}.{key}", value, fields[key].default)
    return cls(**kwargs)


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Give `value` the type of the field's default (ints become floats, lists become tuples)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidInput(where, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            value = parse_number(where, value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(where, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(where, f"expected an integer, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise InvalidInput(where, f"expected a list, got {value!r}")
        if default == () and where.endswith((".mean", ".std")):
            return tuple(float(v) for v in value)
        return tuple(value)
    if not isinstance(value, str):
        raise InvalidInput(where, f"expected a string, got {value!r}")
    return value
