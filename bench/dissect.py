"""Dissection cost, measured side by side in one run on the same images.

1. Throughput: images/s of `dissect()` as `conceptlens dissect` runs it (both passes, no attack; pass 2 reads
   pass 1's candidate maps and compact masks back from its cache) vs a plain forward pass over the same images
   through the same DataLoader (target: dissection ≥ 0.8× forward), and of `dissect()` with the cache off
   (`--no-cache`: pass 2 runs the model again). Images and masks are rendered into memory first so neither side
   pays for ShapesWorld generation. Rounds alternate the sides and each side's best round counts: single rounds
   of this 2-core machine's ratio spread by ±0.02.
2. Memory: peak memory of a dissection over 1k vs 10k generated images (`--memory-n` for more sizes), each in
   a fresh subprocess (peak RSS on CPU, peak CUDA allocation on GPU). Target: flat (ratio ≈ 1): the chunk
   budget (`DissectConfig.chunk_bytes`), not the number of images, sets it.

Prints the ratios and writes bench/results/dissect.json.

    .venv/bin/python bench/dissect.py            # small_cnn 32 px: 2048 images for throughput, 1k vs 10k memory
    .venv/bin/python bench/dissect.py --arch resnet18 --size 112 --n 256 --only throughput
    .venv/bin/python bench/dissect.py --quick    # smoke run (256 images, 250 vs 2.5k for memory)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

RESULTS = Path(__file__).resolve().parent / "results" / "dissect.json"


class InMemory(Dataset):
    """Pre-rendered concept items, with the concept table the dissection needs."""

    def __init__(self, source: Dataset) -> None:
        self.items = [source[i] for i in range(len(source))]
        self.concepts = source.concepts
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def build(size: int, device: str, arch: str = "small_cnn"):
    from conceptlens.handlers.zoo import build_model
    from conceptlens.training.data.shapes import SHAPES_CLASSES

    torch.manual_seed(0)
    return build_model(arch, SHAPES_CLASSES, input_size=size).to(device).eval()


def throughput(args: argparse.Namespace, device: str) -> dict:
    from conceptlens.training.data.shapes import ShapesWorld
    from conceptlens.training.dissect.engine import DissectConfig, dissect

    model = build(args.size, device, args.arch)
    data = InMemory(ShapesWorld(args.n, size=args.size, seed=7, with_masks=True))
    layers = tuple(model.spec.default_layers)
    cached = DissectConfig(layers=layers, batch_size=args.batch_size, cache_dir=tempfile.gettempdir())  # the default
    uncached = DissectConfig(layers=layers, batch_size=args.batch_size, cache=False)
    best_forward = best_dissect = best_uncached = float("inf")
    for _ in range(args.rounds):  # interleaved, best of rounds: damps a shared machine's noise
        start = time.perf_counter()
        with torch.no_grad():
            for batch in DataLoader(data, batch_size=args.batch_size):
                model(batch[0].to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        best_forward = min(best_forward, time.perf_counter() - start)
        start = time.perf_counter()
        dissect(model, data, cached)
        if device == "cuda":
            torch.cuda.synchronize()
        best_dissect = min(best_dissect, time.perf_counter() - start)
        start = time.perf_counter()
        dissect(model, data, uncached)
        if device == "cuda":
            torch.cuda.synchronize()
        best_uncached = min(best_uncached, time.perf_counter() - start)
    fwd, dis, unc = args.n / best_forward, args.n / best_dissect, args.n / best_uncached
    return {"arch": args.arch, "images": args.n, "layers": list(layers), "forward_images_per_s": round(fwd, 1),
            "dissect_images_per_s": round(dis, 1), "ratio": round(dis / fwd, 3),
            "dissect_no_cache_images_per_s": round(unc, 1), "ratio_no_cache": round(unc / fwd, 3),
            "target_ratio": 0.8}


def memory_child(n: int, size: int, batch_size: int, device: str) -> None:
    """Run in a subprocess: dissect n generated images, print the peak memory as JSON."""
    from conceptlens.training.data.shapes import ShapesWorld
    from conceptlens.training.dissect.engine import DissectConfig, dissect

    model = build(size, device)
    data = ShapesWorld(n, size=size, seed=7, with_masks=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_rss = _rss_mb("VmRSS")
    reset = _reset_peak_rss()  # so the peak below is the dissection's, not the imports'
    start = time.perf_counter()
    dissect(model, data, DissectConfig(layers=tuple(model.spec.default_layers), batch_size=batch_size))
    out = {"images": n, "seconds": round(time.perf_counter() - start, 1),
           "peak_rss_mb": _rss_mb("VmHWM") if reset else round(
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_before_mb": setup_rss, "peak_reset": reset}
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MB; -1 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return -1.0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory(args: argparse.Namespace, device: str) -> dict:
    runs = []
    for n in args.memory_n:
        cmd = [sys.executable, __file__, "--child", str(n), "--size", str(args.size), "--batch-size",
               str(args.batch_size), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        logging.info("memory run: %s", runs[-1])
    key = "peak_cuda_mb" if device == "cuda" else "peak_rss_mb"
    return {"runs": runs, "measure": key, "ratio": round(runs[-1][key] / runs[0][key], 3), "target_ratio": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--n", type=int, default=2048, help="images for the throughput comparison")
    parser.add_argument("--arch", default="small_cnn", help="zoo architecture for the throughput comparison")
    parser.add_argument("--memory-n", type=int, nargs="+", default=[1000, 10000],
                        help="image counts of the memory runs (ratio: last / first)")
    parser.add_argument("--size", type=int, default=32, help="image size (small_cnn)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds; each side's best counts")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--only", choices=["throughput", "memory"], help="run one of the two measurements")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from conceptlens.handlers.allocator import tune_allocator

    tune_allocator()  # as the conceptlens command does (handlers/allocator.py)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.child:
        memory_child(args.child, args.size, args.batch_size, device)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.n, args.memory_n, args.rounds = 256, [250, 2500], 1
    result = {
        "machine": {"device": device, "cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "throughput": throughput(args, device) if args.only != "memory" else None,
        "memory": memory(args, device) if args.only != "throughput" else None,
        "settings": {"size": args.size, "batch_size": args.batch_size, "rounds": args.rounds, "quick": args.quick},
    }
    t, m = result["throughput"], result["memory"]
    if t:
        print(f"{t['arch']} {t['layers']}: dissection {t['dissect_images_per_s']} img/s "
              f"vs forward {t['forward_images_per_s']} img/s: "
              f"ratio {t['ratio']} (target >= {t['target_ratio']}); without the activation cache "
              f"{t['dissect_no_cache_images_per_s']} img/s, ratio {t['ratio_no_cache']}")
    if m:
        print(f"peak memory {' vs '.join(str(r['images']) for r in m['runs'])} images: "
              f"{' vs '.join(str(r[m['measure']]) for r in m['runs'])} MB, ratio {m['ratio']} (target ~1)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
