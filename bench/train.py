"""Training cost, measured side by side in one run on the same data.

1. Seconds per epoch of standard, adversarial (λ = 0) and consistent-loss training (same PGD settings), so
   the price of the consistency term is the ratio consistent / adversarial (target ≤ 1.05).
2. Throughput of `torchrun --nproc_per_node=2` against one process on the same global batch.

Regimes are interleaved over `--rounds` rounds and each keeps its fastest epoch, which damps the noise of a
shared machine; both wall seconds and the process's CPU seconds are reported (the CPU figure is the steadier
one when other jobs compete for the cores). Prints the ratios and writes bench/results/train.json.

    .venv/bin/python bench/train.py                 # defaults: 512 ShapesWorld images, 32 px, PGD-3
    .venv/bin/python bench/train.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from conceptlens.training import config as cfg
from conceptlens.training.trainer import git_commit, train

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
REGIMES = {
    "standard": ["attack.name=none"],
    "adversarial": ["attack.name=pgd", "loss.consistency_weight=0"],
    "consistent": ["attack.name=pgd", "loss.consistency_weight=1"],
}


def common(args: argparse.Namespace) -> list[str]:
    return [
        f"data.train=shapes:{args.n}", "data.val=shapes:16", f"data.batch_size={args.batch_size}",
        f"model.input_size={args.size}", f"run.epochs={args.epochs}", f"attack.steps={args.steps}",
        "attack.eps=8/255", "attack.step_size=4/255", "eval.robust_n=0", "run.progress=false",
        "optim.schedule=constant", "optim.lr=0.05",
    ]


def epoch_seconds(run: Path, key: str = "train_seconds") -> list[float]:
    """Per-epoch training time: wall seconds, or `train_cpu_seconds` (CPU time of the process, all threads)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if r["kind"] == "epoch"]


def bench_regimes(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    wall: dict[str, list[float]] = {name: [] for name in REGIMES}
    cpu: dict[str, list[float]] = {name: [] for name in REGIMES}
    for round_ in range(args.rounds):
        for name, overrides in REGIMES.items():
            run = train(cfg.load(None, [*common(args), *overrides]), work / f"{name}-{round_}")
            wall[name] += epoch_seconds(run)
            cpu[name] += epoch_seconds(run, "train_cpu_seconds")
            logging.info("round %d %s: wall %s, cpu %s s/epoch", round_ + 1, name,
                         [f"{t:.2f}" for t in wall[name]], [f"{t:.2f}" for t in cpu[name]])
    return {name: {"seconds_per_epoch": min(wall[name]), "cpu_seconds_per_epoch": min(cpu[name]),
                   "all_epochs": wall[name], "all_epochs_cpu": cpu[name]} for name in REGIMES}


def bench_processes(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Adversarial training as 1 process × 1 thread, 1 process × 2 threads and 2 processes × 1 thread
    (torchrun, gloo), same global batch: how well each way uses 2 cores."""
    flags = [x for o in [*common(args), *REGIMES["adversarial"]] for x in ("--set", o)]
    out: dict[str, dict] = {}
    for procs, threads in ((1, 1), (1, 2), (2, 1)):
        run = work / f"procs-{procs}x{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        launch = [sys.executable, "-m", "conceptlens"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "conceptlens"]
        started = time.perf_counter()
        done = subprocess.run([*launch, "train", *flags, "--out", str(run)], env=env, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{procs}-process run failed: {done.stderr[-2000:]}")
        best = min(epoch_seconds(run))
        out[f"{procs}x{threads}"] = {"processes": procs, "threads_per_process": threads,
                                     "seconds_per_epoch": best, "images_per_second": args.n / best,
                                     "wall_seconds": time.perf_counter() - started}
        logging.info("%d process(es) x %d thread(s): %.2f s/epoch", procs, threads, best)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="training images per epoch")
    parser.add_argument("--size", type=int, default=32, help="image size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="PGD steps of the adversarial regimes")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per regime and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each regime keeps its best)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the in-process regime comparison (1: steadiest on a busy machine)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 images of 32 px, one round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from conceptlens.handlers.allocator import tune_allocator

    tune_allocator()  # as the conceptlens command does (handlers/allocator.py)
    if args.quick:
        args.n, args.size, args.epochs, args.rounds = 128, 32, 1, 1
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("conceptlens.training.trainer").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        regimes = bench_regimes(args, Path(tmp))
        processes = None if args.no_ddp else bench_processes(args, Path(tmp))
    adv = regimes["adversarial"]["seconds_per_epoch"]
    adv_cpu = regimes["adversarial"]["cpu_seconds_per_epoch"]
    ratios = {
        "consistent_over_adversarial": regimes["consistent"]["seconds_per_epoch"] / adv,
        "consistent_over_adversarial_cpu": regimes["consistent"]["cpu_seconds_per_epoch"] / adv_cpu,
        "adversarial_over_standard": adv / regimes["standard"]["seconds_per_epoch"],
        "adversarial_over_standard_cpu": adv_cpu / regimes["standard"]["cpu_seconds_per_epoch"],
    }
    if processes:
        two = processes["2x1"]["seconds_per_epoch"]
        ratios["two_processes_over_one_process_two_threads"] = processes["1x2"]["seconds_per_epoch"] / two
        ratios["two_processes_over_one_process_one_thread"] = processes["1x1"]["seconds_per_epoch"] / two
    result = {
        "benchmark": "train", "regimes": regimes, "processes": processes, "ratios": ratios,
        "target": {"consistent_over_adversarial_max": 1.05},
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"arch": "small_cnn"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "load_average": os.getloadavg()},
        "git_commit": git_commit(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in regimes.items():
        print(f"{name:<12} {r['seconds_per_epoch']:8.2f} s/epoch wall  {r['cpu_seconds_per_epoch']:8.2f} s/epoch CPU")
    print(f"consistent / adversarial (λ=0): {ratios['consistent_over_adversarial']:.3f} wall, "
          f"{ratios['consistent_over_adversarial_cpu']:.3f} CPU  (target <= 1.05)")
    print(f"adversarial / standard:         {ratios['adversarial_over_standard']:.3f} wall, "
          f"{ratios['adversarial_over_standard_cpu']:.3f} CPU")
    if processes:
        print(f"throughput, 2 processes x 1 thread vs 1 process x 2 threads: "
              f"{ratios['two_processes_over_one_process_two_threads']:.3f}x; "
              f"vs 1 process x 1 thread: {ratios['two_processes_over_one_process_one_thread']:.3f}x")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
