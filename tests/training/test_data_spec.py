"""One data-spec grammar: `shapes:N:SEED` names the same images through every command's loader, and one model
opener refuses a directory that is both a run and a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.training import config as train_config
from conceptlens.training.data.registry import open_concepts, open_dataset
from conceptlens.training.data.spec import DEFAULT_SHAPES_N, DataSpec, parse
from conceptlens.training.run import open_model
from conceptlens.training.trainer import open_data

SPEC = "shapes:6:5"


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_shapes_spec_gives_identical_images_through_every_commands_loader() -> None:
    size = 32
    cfg = train_config.load(None, [f"data.train={SPEC}", f"data.val={SPEC}", f"model.input_size={size}"])
    train_set, val_set = open_data(cfg)  # `conceptlens train` (and `experiment`, which trains through it)
    evaluated = open_dataset(SPEC, "val", size=size)  # `conceptlens evaluate` (--split val, its default)
    dissected, info = open_concepts(SPEC, size)  # `conceptlens dissect` and the experiment's probe set
    assert info["split"] == "val" and len(dissected) == 6
    reference = _images(val_set)
    assert torch.equal(_images(evaluated), reference)
    assert torch.equal(_images(dissected), reference)
    assert [dissected[i][1] for i in range(6)] == [val_set[i][1] for i in range(6)]
    assert torch.equal(_images(open_dataset(SPEC, "train", size=size)), _images(train_set))
    assert not torch.equal(_images(train_set), reference)  # the splits never share images
    pinned, _ = open_concepts(SPEC + "@train", size)
    assert torch.equal(_images(pinned), _images(train_set))


def test_grammar_defaults_and_seed_derivation() -> None:
    assert parse("shapes") == DataSpec("shapes", n=DEFAULT_SHAPES_N, seed=0)
    spec = parse("shapes:10:4@test")
    assert (spec.n, spec.seed, spec.split) == (10, 4, "test")
    assert [spec.shapes_seed(s) for s in ("train", "val", "test")] == [12, 13, 14]
    with pytest.raises(UnknownName, match="val"):
        parse("shapes:10@holdout")
    with pytest.raises(InvalidInput, match="does not exist"):
        parse("/no/such/broden/dir")  # a bare path is a Broden directory


def test_concepts_need_masks(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no concept masks"):
        open_concepts(f"imagefolder:{tmp_path}", 32)


def test_a_directory_both_run_and_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InvalidInput, match="both a run directory"):
        open_model(tmp_path)
    with pytest.raises(InvalidInput, match="no such directory"):
        open_model(tmp_path / "missing")
