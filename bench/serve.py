"""Serving benchmark (issue 5): the real server in a subprocess, the real client, side by side in one run.

For each model (resnet18 at 224×224 with random weights, and the default model from `models/` or, when that
repository is empty, a random small_cnn at 64×64):
  - latency at batch 1 and 32: Predict vs Explain with the exact last-layer trace (target ratio ≤ 1.10), and
    the cost of a hidden-layer trace (first-order ranking + exact suffix re-runs of the candidates);
  - throughput with 1, 8 and 32 concurrent clients sending one image per call (the server's dynamic batcher
    merges them) against offline ONNX Runtime at the same batch size in this process (target ≥ 0.85), with
    p50/p99 call latency.
Measuring starts once the server and its children (probe workers, which load torch beside the server) are idle.
Prints a table and writes bench/results/serve.json.

    .venv/bin/python bench/serve.py [--reps 5] [--duration 5] [--models resnet18,default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_repo(repo: Path, which: list[str]) -> dict[str, str]:
    """Export the benchmark bundles into `repo`; returns model name -> description."""
    import torch

    from conceptlens.handlers.zoo import build_model
    from conceptlens.training.export import export_bundle

    described = {}
    if "resnet18" in which:
        torch.manual_seed(0)
        model = build_model("resnet18", [f"class{i}" for i in range(10)], input_size=224).eval()
        export_bundle(model, repo / "resnet18" / "1", name="resnet18", version=1, layers=["layer3", "layer4"])
        described["resnet18"] = "resnet18 224x224, 10 classes, random weights"
    if "default" in which:
        default = ROOT / "models"
        bundles = sorted(p for p in default.glob("*/*/manifest.json")) if default.is_dir() else []
        if bundles:
            src = bundles[-1].parent
            (repo / src.parent.name).mkdir(parents=True, exist_ok=True)
            (repo / src.parent.name / src.name).symlink_to(src, target_is_directory=True)
            described[src.parent.name] = f"default bundle {src.relative_to(ROOT)}"
        else:
            from conceptlens.training.data.shapes import SHAPES_CLASSES

            torch.manual_seed(0)
            model = build_model("small_cnn", SHAPES_CLASSES, input_size=64).eval()
            export_bundle(model, repo / "small_cnn" / "1", name="small_cnn", version=1, layers=["layer2", "layer3"])
            described["small_cnn"] = "small_cnn 64x64 ShapesWorld classes, random weights (models/ is empty)"
    return described


def start_server(repo: Path, threads: int, *extra: str) -> tuple[subprocess.Popen, int]:
    """`conceptlens serve` on a free loopback port, with `extra` flags; returns the process and its port."""
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(repo), "--host", "127.0.0.1", "--port", "0",
           "--poll", "0", "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on port" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.rsplit(" ", 1)[1])


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by process `pid` and its children (the server's probe workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_settled(pid: int, limit_s: float = 90.0, window_s: float = 0.5, idle_cores: float = 0.05) -> float:
    """Wait until the server and its children are idle (the probe workers start beside the server and load torch
    for seconds: measured calls would share the cores with that start-up). Returns the seconds waited."""
    start = time.monotonic()
    if not Path(f"/proc/{pid}/stat").exists():  # no /proc (not Linux): nothing to watch
        return 0.0
    before = _tree_cpu_s(pid)
    while time.monotonic() - start < limit_s:
        time.sleep(window_s)
        now = _tree_cpu_s(pid)
        if now - before < idle_cores * window_s:
            break
        before = now
    return time.monotonic() - start


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Time each function `reps` times, alternating them call by call, so drifting load on a shared machine
    hits all of them alike (side by side in one run)."""
    for _ in range(3):  # warm-up: first calls pay allocator and thread-pool start-up
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def latency(client, model, images, hidden_layer: str, reps: int) -> dict:
    res = {}
    for batch in (1, 32):
        x = list(images[:batch])
        # batch-1 calls are ~2 ms with a p99 over twice that: at least 100 of them (0.4 s), or the median of a
        # ratio near 1.1 moves by ±0.04 from run to run
        t = interleaved({"predict": lambda x=x: client.predict(x, model),
                         "last": lambda x=x: client.explain(x, model)}, max(reps, 100) if batch == 1 else reps)
        # the hidden-layer trace is ~10x slower: fewer calls, each paired with a Predict for its ratio
        th = interleaved({"predict": lambda x=x: client.predict(x, model),
                          "hidden": lambda x=x: client.explain(x, model, layers=[hidden_layer])}, max(1, reps // 2))
        p, e, h = statistics.median(t["predict"]), statistics.median(t["last"]), statistics.median(th["hidden"])
        res[f"batch{batch}"] = {"predict_s": p, "explain_last_layer_s": e, "explain_hidden_layer_s": h,
                                "hidden_layer": hidden_layer, "ratio_last": e / p,
                                "ratio_hidden": h / statistics.median(th["predict"])}
    return res


def throughput(client, model, image, clients: int, duration: float) -> dict:
    stop = time.monotonic() + duration
    lat: list[float] = []
    lock = threading.Lock()

    def worker():
        mine = []
        while time.monotonic() < stop:
            start = time.perf_counter()
            client.predict([image], model)
            mine.append(time.perf_counter() - start)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"images_per_s": len(lat) / elapsed, "p50_s": pct(lat, 50), "p99_s": pct(lat, 99), "calls": len(lat)}


def offline(onnx_path: Path, images: np.ndarray, batch: int, duration: float, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(images[:batch])
    session.run(["logits"], {"images": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        session.run(["logits"], {"images": x})
        n += batch
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,default", help="comma list of resnet18, default")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per latency figure (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput point")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (server and offline)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args(argv)
    from conceptlens_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        described = build_repo(repo, args.models.split(","))
        proc, port = start_server(repo, args.threads)
        settled = wait_settled(proc.pid)
        results = {"host": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                   "server_settle_s": settled, "models": {}}
        try:
            with Client(f"127.0.0.1:{port}", timeout=600) as client:
                for info in client.models():
                    name, size = info.model, info.input.size
                    images = np.random.default_rng(0).random((32, 3, size, size), dtype=np.float32)
                    hidden = info.layers[0].name  # the shallowest traced layer
                    row = {"description": described.get(name, name),
                           "latency": latency(client, name, images, hidden, args.reps), "throughput": {}}
                    onnx_path = Path(tmp) / "repo" / name / str(info.version) / "model.onnx"
                    for c in (1, 8, 32):  # offline halves before and after the served run share its drift
                        off1 = offline(onnx_path, images, c, args.duration / 2, args.threads)
                        served = throughput(client, name, images[0], c, args.duration)
                        off = (off1 + offline(onnx_path, images, c, args.duration / 2, args.threads)) / 2
                        row["throughput"][f"clients{c}"] = {**served, "offline_images_per_s": off,
                                                            "ratio": served["images_per_s"] / off}
                    results["models"][name] = row
        finally:
            proc.terminate()
            proc.wait(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for name, row in results["models"].items():
        print(f"\n{name}: {row['description']}")
        for b, r in row["latency"].items():
            print(f"  {b}: predict {r['predict_s'] * 1e3:.1f} ms, "
                  f"explain(last) {r['explain_last_layer_s'] * 1e3:.1f} ms"
                  f" (x{r['ratio_last']:.2f}), explain({r['hidden_layer']}) {r['explain_hidden_layer_s'] * 1e3:.1f} ms"
                  f" (x{r['ratio_hidden']:.2f})")
        for c, r in row["throughput"].items():
            print(f"  {c}: {r['images_per_s']:.1f} img/s vs offline ORT {r['offline_images_per_s']:.1f} img/s "
                  f"(ratio {r['ratio']:.2f}); p50 {r['p50_s'] * 1e3:.1f} ms, p99 {r['p99_s'] * 1e3:.1f} ms")
    print(f"\nload average at start {results['load_average'][0]:.1f} on {results['cpus']} CPUs; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
