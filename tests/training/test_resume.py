"""Crash safety: atomic checkpoints, and a run killed with SIGKILL mid-epoch that resumes to bit-identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptlens.training import checkpoint

ARGS = [
    "--data", "shapes:96", "--val-data", "shapes:32", "--batch-size", "16", "--epochs", "2", "--attack", "pgd",
    "--steps", "2", "--set", "model.input_size=32", "--set", "run.checkpoint_every=2", "--set", "eval.robust_n=16",
    "--set", "eval.steps=1", "--set", "eval.batch_size=32", "--no-progress",
]  # 6 steps per epoch, 12 in all; checkpoints at steps 2 and 4 (mid-epoch) and 6 (end of epoch 1)
TOTAL_STEPS = 12


def _env() -> dict[str, str]:
    # one thread per process: the same reduction order in both runs, and less load on a shared machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "conceptlens", "train", *args], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def _step_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    ref_proc = _train(*ARGS, "--out", str(reference))
    proc = _train(*ARGS, "--out", str(crashed))
    last = crashed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "model.safetensors").exists()
    position = checkpoint.load(last)["position"]
    assert 0 < position["batch"] < 6 and position["step"] < TOTAL_STEPS  # killed mid-epoch, after a checkpoint

    _finish(_train("--resume", str(crashed), "--no-progress"))
    _finish(ref_proc)

    want, got = load_file(str(reference / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # the log of the resumed run is the uninterrupted run's log: no lost or doubled steps, identical losses
    ref_steps, got_steps = _step_records(reference), _step_records(crashed)
    assert [r["step"] for r in got_steps] == list(range(1, TOTAL_STEPS + 1))
    assert got_steps == ref_steps
    ref_meta, got_meta = (json.loads((r / "run.json").read_text()) for r in (reference, crashed))
    assert got_meta["metrics"] == ref_meta["metrics"] and got_meta["steps"] == TOTAL_STEPS


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "checkpoints" / "last.pt"
    kwargs = dict(model=model, optimizer=optimizer, scheduler=None, scaler=None, rng_states=[checkpoint.rng_state()])
    checkpoint.save(path, position=checkpoint.Position(3, 0, 3), **kwargs)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(path, position=checkpoint.Position(4, 0, 4), extra={"x": Unpicklable()}, **kwargs)
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_resume_without_checkpoint_names_the_problem(tmp_path: Path) -> None:
    from conceptlens.cli import main

    assert main(["train", "--resume", str(tmp_path)]) == 2
