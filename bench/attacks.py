"""Attack speed: our PGD-10 and MI-FGSM-10 against torchattacks 3.5.1, side by side in one run.

Same model, same images, same ε/α/steps; the timed calls are interleaved (ours, theirs, theirs, ours, ...) so
load drift on a shared machine hits both sides. Reports median wall time and median process CPU time per call,
the ratio theirs/ours (> 1: ours is faster) and images/s, on resnet18 (random weights, 10 classes) and on the
ShapesWorld small_cnn. Writes bench/results/attacks.json.

Both sides do the same work: ours run with `lazy = True`, so the per-sample success and adversarial logits
(one more forward pass, which torchattacks never computes) are only judged when asked for.

torchattacks is installed into the running environment if missing (benchmark only; not a project dependency).
It is installed without its dependencies: its package __init__ imports scipy (for attacks we do not time), so if
that import fails the two attack modules are loaded directly; they need nothing but torch.

    .venv/bin/python bench/attacks.py                      # resnet18 at 32 px, batch 32 (minutes on 2 busy CPUs)
    .venv/bin/python bench/attacks.py --size 224 --repeats 3  # the ImageNet size (slow on CPU)
    OMP_NUM_THREADS=1 .venv/bin/python bench/attacks.py --repeats 5  # on a CPU shared with other jobs

On a loaded machine, two intra-op threads per process spend most of their time waiting for each other and single
calls vary tenfold; one thread per process gives stable ratios.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from conceptlens.handlers.attacks import MIFGSM, PGD
from conceptlens.handlers.zoo import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "attacks.json"
TORCHATTACKS = "torchattacks==3.5.1"
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10

log = logging.getLogger("bench.attacks")


def load_torchattacks(install: bool) -> types.SimpleNamespace:
    """torchattacks' PGD and MIFGSM classes (installing the package without dependencies if it is missing)."""
    if importlib.util.find_spec("torchattacks") is None:
        if not install:
            raise SystemExit("torchattacks is not installed (run without --no-install to install it)")
        log.info("installing %s into %s (benchmark only)", TORCHATTACKS, sys.prefix)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", TORCHATTACKS], check=True)
        importlib.invalidate_caches()
    try:
        import torchattacks
    except ModuleNotFoundError as err:  # scipy/requests are needed only by attacks we do not time
        log.info("torchattacks' package import needs %s; loading its PGD and MIFGSM modules directly", err.name)
        for name in [m for m in sys.modules if m == "torchattacks" or m.startswith("torchattacks.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchattacks")
        stub.__path__ = list(importlib.util.find_spec("torchattacks").submodule_search_locations)
        sys.modules["torchattacks"] = stub
        torchattacks = stub
        torchattacks.PGD = importlib.import_module("torchattacks.attacks.pgd").PGD
        torchattacks.MIFGSM = importlib.import_module("torchattacks.attacks.mifgsm").MIFGSM
    from importlib.metadata import version

    return types.SimpleNamespace(PGD=torchattacks.PGD, MIFGSM=torchattacks.MIFGSM, version=version("torchattacks"))


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(
    name: str, ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor], images: torch.Tensor,
    repeats: int, warmup: int,
) -> dict:
    """Interleaved timing of two callables doing the same attack on the same batch."""
    device, batch = images.device, images.shape[0]
    for _ in range(warmup):
        for adv in (ours(), theirs()):  # same work on both sides: both stay in the ε-ball
            assert (adv - images).abs().max() <= EPS + 1e-5
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "torchattacks": []}
    for r in range(repeats):
        order = [("ours", ours), ("torchattacks", theirs)]
        for side, fn in order if r % 2 == 0 else order[::-1]:
            times[side].append(_timed(fn, device))
    out: dict = {"attack": name}
    for side, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        out[side] = {"wall_s": wall, "cpu_s": cpu, "images_per_s": batch / wall, "all_wall_s": [w for w, _ in samples]}
    out["ratio_wall"] = out["torchattacks"]["wall_s"] / out["ours"]["wall_s"]
    out["ratio_cpu"] = out["torchattacks"]["cpu_s"] / out["ours"]["cpu_s"]
    log.info("%s: ours %.2fs, torchattacks %.2fs (wall ratio %.2f, cpu ratio %.2f)", name,
             out["ours"]["wall_s"], out["torchattacks"]["wall_s"], out["ratio_wall"], out["ratio_cpu"])
    return out


def bench_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, ta: types.SimpleNamespace,
                args: argparse.Namespace, label: str) -> list[dict]:
    def lazy(atk):  # judge success/logits only on demand: the same work as torchattacks, which returns images only
        atk.lazy = True
        return atk

    pairs = {
        f"PGD-{STEPS}": (lazy(PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)),
                         ta.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)),
        f"MI-FGSM-{STEPS}": (lazy(MIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=1.0)),
                             ta.MIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=1.0)),
    }
    rows = []
    for name, (ours, theirs) in pairs.items():
        row = compare(name, lambda ours=ours: ours(images, labels).adv, lambda theirs=theirs: theirs(images, labels),
                      images, args.repeats, args.warmup)
        row["model"] = label
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", type=int, default=32, help="resnet18 input size (default 32; 224 = ImageNet)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--shapes-size", type=int, default=32, help="ShapesWorld image size for small_cnn (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (default 3; median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first, the first one checking "
                        "that both sides stay in the ε-ball (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-install", action="store_true", help="fail instead of pip-installing torchattacks")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    args = parser.parse_args(argv)
    from conceptlens.handlers.allocator import tune_allocator

    tune_allocator()  # as the conceptlens command does (handlers/allocator.py)
    for field in ("size", "batch", "shapes_size", "repeats"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ta = load_torchattacks(install=not args.no_install)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    resnet = build_model("resnet18", [f"c{i}" for i in range(10)], input_size=args.size).to(device).eval()
    images = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    rows = bench_model(resnet, images, labels, ta, args, f"resnet18@{args.size}")

    from conceptlens.training.data.shapes import SHAPES_CLASSES, ShapesWorld

    shapes = ShapesWorld(args.batch, size=args.shapes_size, seed=0)
    items = [shapes[i] for i in range(args.batch)]
    s_images = torch.stack([im for im, _ in items]).to(device)
    s_labels = torch.tensor([lab for _, lab in items], device=device)
    cnn = build_model("small_cnn", SHAPES_CLASSES, input_size=args.shapes_size).to(device).eval()
    rows += bench_model(cnn, s_images, s_labels, ta, args, f"small_cnn@{args.shapes_size} (ShapesWorld)")

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "torchattacks": ta.version, "device": str(device),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "batch": args.batch, "eps": EPS, "alpha": ALPHA, "steps": STEPS, "repeats": args.repeats,
        "ratio": "torchattacks time / our time (> 1: ours faster)", "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'model':34} {'attack':11} {'ours s':>8} {'theirs s':>9} {'wall ratio':>10} {'cpu ratio':>9} "
          f"{'ours img/s':>10}")
    for row in rows:
        print(f"{row['model']:34} {row['attack']:11} {row['ours']['wall_s']:8.2f} {row['torchattacks']['wall_s']:9.2f} "
              f"{row['ratio_wall']:10.2f} {row['ratio_cpu']:9.2f} {row['ours']['images_per_s']:10.1f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
