"""TrainConfig: TOML + overrides, typed coercion, and validation that names the problem and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.training import config as cfg

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_validate_and_are_frozen() -> None:
    c = cfg.load()
    cfg.validate(c)
    assert c.regime == "consistent"
    with pytest.raises(AttributeError):
        c.run.epochs = 3  # type: ignore[misc]


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[attack]\nname = "pgd"\neps = 0.01\n[loss]\nconsistency_weight = 2\nlayers = ["layer3"]\n')
    c = cfg.load(path, ["loss.consistency_weight=0", "attack.eps=8/255", "optim.name=adamw", "run.epochs=3"])
    assert c.loss.consistency_weight == 0.0 and isinstance(c.loss.consistency_weight, float)
    assert c.attack.eps == pytest.approx(8 / 255)
    assert c.optim.name == "adamw" and c.run.epochs == 3
    assert c.loss.layers == ("layer3",)
    assert c.regime == "adversarial"
    assert cfg.load(None, ["loss.layers=layer2,layer3"]).loss.layers == ("layer2", "layer3")


@pytest.mark.parametrize("name", ["shapes_standard", "shapes_adversarial", "shapes_consistent"])
def test_shipped_configs_are_the_three_regimes(name: str) -> None:
    c = cfg.load(CONFIGS / f"{name}.toml")
    cfg.validate(c)
    assert c.regime == name.removeprefix("shapes_")


@pytest.mark.parametrize(
    ("override", "error", "named"),
    [
        ("model.arch=not_an_arch", UnknownName, "small_cnn"),
        ("optim.name=lbfgs", UnknownName, "adamw"),
        ("optim.schedule=linear", UnknownName, "onecycle"),
        ("attack.name=cw", UnknownName, "pgd"),
        ("attack.norm=l1", UnknownName, "linf"),
        ("loss.distance=kl", UnknownName, "relative"),
        ("loss.layers=layer9", UnknownName, "layer3"),
        ("run.epochs=0", InvalidInput, "run.epochs"),
        ("attack.eps=-1", InvalidInput, "attack.eps"),
        ("attack.eps=abc", InvalidInput, "8/255"),
        ("run.epochs=2.5", InvalidInput, "integer"),
        ("run.amp=yes", InvalidInput, "true or false"),
    ],
)
def test_bad_values_name_the_problem(override: str, error: type, named: str) -> None:
    with pytest.raises(error, match=named):
        cfg.validate(cfg.load(None, [override]))


def test_unknown_section_and_key_list_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownName, match="attack"):
        cfg.load(None, ["atack.eps=0.1"])
    with pytest.raises(UnknownName, match="consistency_weight"):
        cfg.load(None, ["loss.lambda=0.1"])
    with pytest.raises(InvalidInput, match=r"section\.key=value"):
        cfg.load(None, ["epochs=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nepochs=1")
    with pytest.raises(InvalidInput, match=r"bad\.toml"):
        cfg.load(bad)
    with pytest.raises(InvalidInput, match="no such file"):
        cfg.load(tmp_path / "missing.toml")


def test_round_trip_through_dict() -> None:
    c = cfg.load(None, ["loss.layers=layer2", "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]"])
    assert cfg.from_dict(c.to_dict()) == c
