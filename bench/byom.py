"""Bring-your-own-model benchmark at 224 px: timm resnet50 and convnext_tiny with random weights, taken through
the path a team takes (state dict -> `import_run` -> `export_bundle` -> `conceptlens serve`), side by side in one
run.

Per model:
  - export seconds (ONNX trace + ONNX-vs-torch check + manifest; no detector, no dissection labels);
  - Explain / Predict latency at batch 1 and 8 over the real server and client, interleaved call by call.
    Explain traces the deepest default layer: resnet50's layer4 feeds pooling + linear (exact last-layer path,
    target <= 1.10); convnext_tiny's head has a LayerNorm after pooling, so its stages.3 takes the exact
    hidden-layer path (first-order ranking + suffix re-runs), whose cost is reported, not targeted;
  - dissection images/s vs a plain forward pass over the same in-memory ShapesWorld images at 224 px
    (bench/dissect.py's measurement, default layers, the 224-px default batch size; target >= 0.8).
Prints the ratios and writes bench/results/byom.json.

    nice -n 10 .venv/bin/python bench/byom.py [--archs timm:resnet50,timm:convnext_tiny] [--reps 10] [--n 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the sibling benches' helpers: one implementation of each measurement

import dissect as dissect_bench  # noqa: E402
import serve as serve_bench  # noqa: E402

SIZE = 224
CLASSES = [f"class{i}" for i in range(10)]


def make_bundle(arch: str, root: Path) -> tuple[str, float, str]:
    """A random-weight state dict of `arch`, imported and exported into root/repo; (name, export s, method)."""
    import timm
    import torch

    from conceptlens.handlers.backends import _linear_head
    from conceptlens.training.cli_import import import_run
    from conceptlens.training.export import export_bundle
    from conceptlens.training.run import load_run

    name = arch.removeprefix("timm:").replace("_", "-")
    torch.manual_seed(0)
    weights = root / f"{name}.pth"
    torch.save(timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=len(CLASSES)).state_dict(),
               weights)
    run = root / f"run-{name}"
    meta = import_run(arch, weights, CLASSES, run, input_size=SIZE)
    model = load_run(run)
    start = time.perf_counter()
    out = export_bundle(model, root / "repo" / name / "1", name=name, version=1, layers=meta["layers"])
    seconds = time.perf_counter() - start
    from conceptlens.handlers.bundle import load_bundle

    bundle = load_bundle(out, verify_onnx=False)
    layers = {info.name: info for info in bundle.manifest.layers}
    method = "exact-last-layer" if _linear_head(model, layers) is not None else "suffix-rerun"
    return name, seconds, method


def latency(client, name: str, images: np.ndarray, reps: int) -> dict:
    out = {}
    for batch in (1, 8):
        x = list(images[:batch])
        n = reps if batch == 1 else max(2, reps // 3)
        t = serve_bench.interleaved({"predict": lambda x=x: client.predict(x, name),
                                     "explain": lambda x=x: client.explain(x, name)}, n)
        p, e = statistics.median(t["predict"]), statistics.median(t["explain"])
        out[f"batch{batch}"] = {"predict_s": round(p, 4), "explain_s": round(e, 4), "ratio": round(e / p, 3),
                                "calls": n}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="timm:resnet50,timm:convnext_tiny", help="comma list of timm:NAME")
    parser.add_argument("--reps", type=int, default=10, help="interleaved calls per batch-1 figure (batch 8: a third)")
    parser.add_argument("--n", type=int, default=48, help="images for the dissection throughput")
    parser.add_argument("--rounds", type=int, default=2, help="dissection rounds (best counts)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads in the server")
    parser.add_argument("--skip-dissect", action="store_true", help="latency and export only")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "byom.json")
    args = parser.parse_args(argv)
    from conceptlens.handlers.allocator import tune_allocator
    from conceptlens.training.cli_dissect import default_batch_size
    from conceptlens_client import Client

    tune_allocator()
    results: dict = {"host": platform.node(), "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                     "size": SIZE, "models": {}}
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = {arch: make_bundle(arch, root) for arch in archs}
        proc, port = serve_bench.start_server(root / "repo", args.threads)
        try:
            results["server_settle_s"] = serve_bench.wait_settled(proc.pid)
            images = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
            with Client(f"127.0.0.1:{port}", timeout=600) as client:
                for arch, (name, export_s, method) in made.items():
                    results["models"][arch] = {"export_s": round(export_s, 2), "explain_method": method,
                                               "latency": latency(client, name, images, args.reps)}
        finally:
            proc.terminate()
            proc.wait(30)
    if not args.skip_dissect:
        for arch in archs:
            ns = argparse.Namespace(arch=arch, size=SIZE, n=args.n, batch_size=default_batch_size(SIZE),
                                    rounds=args.rounds)
            results["models"][arch]["dissection"] = dissect_bench.throughput(ns, "cpu")
    results["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for arch, row in results["models"].items():
        print(f"\n{arch} at {SIZE} px (random weights): export {row['export_s']:.1f} s; Explain via "
              f"{row['explain_method']}")
        for b, r in row["latency"].items():
            print(f"  {b}: predict {r['predict_s'] * 1e3:.0f} ms, explain {r['explain_s'] * 1e3:.0f} ms "
                  f"(x{r['ratio']:.2f}; {r['calls']} calls each)")
        if "dissection" in row:
            d = row["dissection"]
            print(f"  dissection {d['dissect_images_per_s']} img/s vs forward {d['forward_images_per_s']} img/s "
                  f"(ratio {d['ratio']:.2f}; {d['images']} images, layers {', '.join(d['layers'])})")
    load = results["load_average_start"][0], results["load_average_end"][0]
    print(f"\nload average {load[0]:.1f} at start, {load[1]:.1f} at end, on {results['cpus']} CPUs; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
