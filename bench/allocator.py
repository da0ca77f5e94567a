"""The CPU allocator's effect on an adversarial training step, side by side in one run (handlers/allocator.py).

Each mode runs in its own process (mallopt settings last for the process): glibc as it comes, the mmap threshold
raised to glibc's 32 MB ceiling only, and `tune_allocator()` (no mmap()ed blocks at all). A step is what
`conceptlens train` does for the default bundle's config: PGD-7 on a batch of 64 images of 64 px of small_cnn,
then one SGD step on the adversarial batch. Reports seconds, page faults and system seconds per step, and the
ratios against glibc's default. Writes bench/results/allocator.json.

    .venv/bin/python bench/allocator.py [--steps 6] [--size 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "allocator.json"

_STEP = """
import ctypes, json, resource, sys, time, torch
mode, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "tuned":
    from conceptlens.handlers.allocator import tune_allocator
    assert tune_allocator()
elif mode == "threshold_only":  # what tune_allocator did before it also set M_MMAP_MAX
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30)
from conceptlens.handlers.attacks import PGD
from conceptlens.handlers.zoo import build_model
torch.manual_seed(0)
model = build_model("small_cnn", [str(i) for i in range(9)], input_size=size)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.rand(64, 3, size, size), torch.randint(0, 9, (64,))

def step():
    model.eval()
    adv = PGD(model, eps=8 / 255, steps=7, random_start=True)(x, y).adv
    model.train()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(adv), y).backward()
    opt.step()

step()  # warm-up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(json.dumps({"s_per_step": wall / steps, "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps}))
"""

MODES = ("glibc_default", "threshold_only", "tuned")


def run_mode(mode: str, size: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
           and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", _STEP, mode, str(size), str(steps)], env=env, capture_output=True,
                          text=True, check=True, timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and round (default 6)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (default 64, the default bundle's)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each mode keeps its fastest")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits every mode alike
        for mode in MODES:
            result = run_mode(mode, args.size, args.steps)
            if mode not in best or result["s_per_step"] < best[mode]["s_per_step"]:
                best[mode] = result
    base = best["glibc_default"]["s_per_step"]
    print(f"PGD-7 training step, batch 64, {args.size} px, small_cnn, {torch_threads()} torch threads "
          f"(best of {args.rounds} rounds of {args.steps} steps)")
    for mode in MODES:
        r = best[mode]
        print(f"  {mode:15s} {r['s_per_step']:.3f} s/step ({base / r['s_per_step']:.2f}x glibc default), "
              f"{r['faults_per_step']:,.0f} page faults and {r['sys_s_per_step']:.3f} s system time per step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "allocator", "size": args.size, "steps": args.steps,
                                    "rounds": args.rounds, "best": best,
                                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                "load_average_at_end": os.getloadavg()}}, indent=2))
    print(f"wrote {args.out}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
