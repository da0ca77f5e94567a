"""Data parallel training: `torchrun --nproc_per_node=2 -m conceptlens train` on CPU (gloo) against one process.

With a global batch of B split over 2 ranks, DistributedSampler hands step s the same B images as the
one-process run (rank r takes every other index of the same permutation), so the two runs differ only by
per-rank batch-norm statistics and attack random starts: their losses and accuracies must agree within noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = [
    "--data", "shapes:256", "--val-data", "shapes:128", "--batch-size", "32", "--epochs", "3", "--lr", "0.1",
    "--schedule", "onecycle", "--attack", "pgd", "--steps", "1", "--lambda", "0.5", "--set", "model.input_size=32",
    "--set", "eval.robust_n=32", "--set", "eval.steps=1", "--set", "eval.batch_size=64", "--no-progress",
]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run([sys.executable, "-m", "conceptlens", "train", *ARGS, "--out", str(one)])
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = _run([*torchrun, "-m", "conceptlens", "train", *ARGS, "--out", str(two)])
    assert double.returncode == 0, double.stderr[-3000:]

    meta_one, meta_two = (json.loads((r / "run.json").read_text()) for r in (one, two))
    assert meta_one["world_size"] == 1 and meta_two["world_size"] == 2
    rec_one, rec_two = _records(one), _records(two)
    steps_one = [r for r in rec_one if r["kind"] == "step"]
    steps_two = [r for r in rec_two if r["kind"] == "step"]
    # only rank 0 writes: one record per step, not one per process
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == list(range(1, 25))
    # step 1: same weights, same 32 images; only BN batch statistics (16 vs 32 images) and PGD starts differ
    assert steps_two[0]["ce_clean"] == pytest.approx(steps_one[0]["ce_clean"], rel=0.05)
    assert steps_two[0]["lr"] == steps_one[0]["lr"]

    def last_epoch_loss(steps: list[dict]) -> float:
        return sum(r["loss"] for r in steps[-8:]) / 8

    assert last_epoch_loss(steps_two) == pytest.approx(last_epoch_loss(steps_one), rel=0.3)
    acc_one = [r for r in rec_one if r["kind"] == "epoch"][-1]["clean_accuracy"]
    acc_two = [r for r in rec_two if r["kind"] == "epoch"][-1]["clean_accuracy"]
    assert acc_one > 0.3 and acc_two > 0.3  # both learn (chance is 1/9)
    assert abs(acc_one - acc_two) <= 0.15
