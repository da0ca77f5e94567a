"""`conceptlens data shapes` run as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conceptlens.cli import main
from conceptlens.training.data.broden import BrodenDataset

CLI = Path(sys.executable).parent / "conceptlens"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "data", "shapes", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_writes_broden_layout_the_reader_loads(tmp_path):
    out = tmp_path / "shapes"
    done = _run("--out", str(out), "--n", "30", "--size", "32", "--seed", "3", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == 30 and summary["val"] == 6 and summary["images_per_second"] > 0
    for name in ("index.csv", "category.csv", "label.csv", "c_object.csv", "c_part.csv", "c_color.csv",
                 "c_texture.csv"):
        assert (out / name).is_file(), name
    ds = BrodenDataset(out)
    assert len(ds) == 30 and len(BrodenDataset(out, split="val")) == 6
    image, label, masks = ds[0]
    assert image.shape == (3, 32, 32) and label == 0 and masks["object"].max() > 0


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_bad_input_from_the_shell_is_one_line_and_exit_2(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    done = _run("--out", str(target), "--n", "5")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a directory" in lines[0]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--n", "0"], "--n"),
        (["--n", "-4"], "--n"),
        (["--n", "5", "--size", "8"], "--size"),
        (["--n", "5", "--val-fraction", "1.5"], "--val-fraction"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, mentions):
    # Same dispatcher as the console script, in-process (each subprocess costs seconds of imports).
    code = main(["data", "shapes", "--out", str(tmp_path / "new"), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and mentions in lines[0] and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # validated before any work


def test_existing_dataset_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "index.csv").write_text("image,split,ih,iw,sh,sw\n")
    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "3"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
