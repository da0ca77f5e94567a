"""Soak run (issue 14; not in CI): the real server in a subprocess on loopback, mixed Predict / Explain / Probe
traffic at a bounded rate from independent clients, and a bundle reload (a new version copied into the repository,
the oldest removed) every `--reload-s` seconds, for `--minutes` minutes.

Reports, per method, the status codes the clients received (target: no INTERNAL or UNKNOWN), the server's own
count of them from /metrics, tracebacks in the server log, the versions served after each reload, and the
resident memory of the server process and of its whole process tree (probe workers included) sampled every few
seconds: growth = median over the last minute / median over the minute after warm-up - 1 (target <= 5%).
With `--front`, the clients call through `conceptlens front` (nginx, server/front.py): its refusals (scraped from
its own /metrics) are reported beside the server's codes, and its processes' memory beside the server's.
Writes bench/results/soak.json (soak_front.json with --front).

    nice -n 10 .venv/bin/python bench/soak.py [--minutes 10] [--reload-s 60] [--warmup-min 2] [--probe-workers 1]
                                              [--front]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from overload import free_port, scrape_samples

ROOT = Path(__file__).resolve().parents[1]
NAME = "soak"
SIZE = 32
LAYERS = ["layer1", "layer2", "layer3"]


def export_source(out: Path) -> Path:
    """One small_cnn bundle (random weights, 4 classes) to copy into the repository as each new version."""
    import torch

    from conceptlens.handlers.zoo import build_model
    from conceptlens.training.export import export_bundle

    torch.manual_seed(0)
    model = build_model("small_cnn", ["car", "house", "tree", "boat"], input_size=SIZE).eval()
    return export_bundle(model, out, name=NAME, version=1, layers=LAYERS)


def publish(src: Path, repo: Path, version: int) -> None:
    """Copy a bundle in as `version` the way exporters do: a hidden sibling, then one rename."""
    tmp = repo / NAME / f".{version}.tmp"
    shutil.copytree(src, tmp)
    os.replace(tmp, repo / NAME / str(version))


def rss_kb(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Traffic:
    """Client threads, each with its own channel, calling one method at a bounded rate; codes counted per method."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.messages: dict[str, str] = {}  # first message of each unexpected code
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def run(self, method: str, call, period_s: float) -> None:
        def loop() -> None:
            from conceptlens_client import Client, ServiceError

            rng = np.random.default_rng(len(self.threads))
            with Client(self.target, timeout=60) as client:
                while not self.stop.is_set():
                    start = time.monotonic()
                    try:
                        call(client, rng)
                        code = "OK"
                    except ServiceError as err:
                        code = err.code
                        if code in ("INTERNAL", "UNKNOWN"):
                            self.messages.setdefault(f"{method} {code}", err.message[:300])
                    with self._lock:
                        self.codes[method][code] += 1
                    self.stop.wait(max(0.0, period_s - (time.monotonic() - start)))

        thread = threading.Thread(target=loop, name=f"soak-{method}", daemon=True)
        self.threads.append(thread)
        thread.start()


def predict_raw(client, rng) -> None:
    client.predict([rng.random((3, SIZE, SIZE), dtype=np.float32) for _ in range(4)], NAME, timeout=5)


def predict_png(client, rng) -> None:
    client.predict([png(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))], NAME, timeout=5)


def explain(client, rng) -> None:
    client.explain([rng.random((3, SIZE, SIZE), dtype=np.float32) for _ in range(2)], NAME, layers=LAYERS,
                   depth=2, top_k_units=3, include_maps=True, timeout=20)


def probe(client, rng) -> None:
    client.probe([rng.random((3, SIZE, SIZE), dtype=np.float32)], NAME, attack="pgd", epsilon=8 / 255, steps=5,
                 timeout=60)


def scrape_totals(port: int, name: str, label: str) -> dict[str, float]:
    """Samples called `name` on a /metrics page, summed by one label (e.g. conceptlens_requests_total by code)."""
    totals: dict[str, float] = collections.Counter()
    for labels, value in scrape_samples(port, name):
        totals[labels[label]] += value
    return dict(totals)


def start_front(backend: str, directory: Path, log) -> tuple[subprocess.Popen, str, int]:
    """`conceptlens front` before the server: (process, the address clients dial, its metrics port)."""
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "conceptlens", "front", "--backend", backend, "--listen", listen,
                             "--metrics-port", str(metrics_port), "--dir", str(directory)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    if "conceptlens front:" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("conceptlens front did not start (is nginx installed?)")
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])), timeout=1).close()
            return proc, listen, metrics_port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--reload-s", type=float, default=60.0, help="seconds between bundle reloads (default 60)")
    parser.add_argument("--warmup-min", type=float, default=2.0,
                        help="minutes excluded from the memory baseline (default 2)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples (default 5)")
    parser.add_argument("--probe-workers", type=int, default=1,
                        help="the server's --probe-workers (default 1; 0 runs probes on a server thread)")
    parser.add_argument("--front", action="store_true",
                        help="call through `conceptlens front` (needs nginx) and report its refusals and memory")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default bench/results/soak.json, soak_front.json with --front)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / ("soak_front.json" if args.front else "soak.json")
    if args.minutes <= args.warmup_min + 1:
        parser.error("--minutes must exceed --warmup-min by more than one minute (baseline and final windows)")

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        src = export_source(tmp / "src")
        repo = tmp / "repo"
        (repo / NAME).mkdir(parents=True)
        publish(src, repo, 1)
        metrics_port = free_port()
        log_path = tmp / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "conceptlens", "serve", "--models", str(repo), "--host", "127.0.0.1",
                 "--port", "0", "--metrics-port", str(metrics_port), "--poll", "2", "--grace", "5",
                 "--probe-workers", str(args.probe_workers)],
                stdout=subprocess.PIPE, stderr=log, text=True)
            line = server.stdout.readline()
            if "listening on port" not in line:
                server.kill()
                print(f"soak: server did not start: {line!r}; log: {log_path.read_text()[-2000:]}", file=sys.stderr)
                return 1
            port = int(line.rsplit(" ", 1)[1])
            target, front = f"127.0.0.1:{port}", None
            try:
                if args.front:
                    front, target, front_metrics_port = start_front(target, tmp / "front", log)
                result = soak(args, server.pid, target, metrics_port, src, repo,
                              front=(front.pid, front_metrics_port) if front else None)
            finally:
                if front is not None:
                    front.terminate()
                    front.wait(30)
                server.terminate()
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
        server_log = log_path.read_text()
    result["server_exit_code"] = server.returncode
    result["server_log_tracebacks"] = server_log.count("Traceback")
    notable = [line for line in server_log.splitlines() if line.startswith(("WARNING", "ERROR", "CRITICAL"))]
    result["server_log_errors"] = sum(1 for line in notable if not line.startswith("WARNING"))
    result["server_log_notable"] = notable[:20] + (["...", *notable[-20:]] if len(notable) > 40 else notable[20:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    report(result)
    print(f"wrote {args.out}")
    return 0


def soak(args, pid: int, target: str, metrics_port: int, src: Path, repo: Path,
         front: tuple[int, int] | None = None) -> dict:
    """`front`: (pid, metrics port) of `conceptlens front` when the clients call through it."""
    from conceptlens_client import Client

    traffic = Traffic(target)
    traffic.run("Predict", predict_raw, 0.05)
    traffic.run("Predict", predict_png, 0.05)
    traffic.run("Predict", predict_raw, 0.1)
    traffic.run("Explain", explain, 0.5)
    traffic.run("Probe", probe, 2.0)
    start = time.monotonic()
    end = start + args.minutes * 60
    next_reload = start + args.reload_s
    next_sample = start
    version = 1
    reloads: list[dict] = []
    samples: list[tuple[float, int, int, int]] = []  # (seconds since start, server, its tree, front tree: RSS kB)
    with Client(target, timeout=30) as control:
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                samples.append((now - start, rss_kb(pid), sum(rss_kb(p) for p in tree_pids(pid)),
                                sum(rss_kb(p) for p in tree_pids(front[0])) if front else 0))
                next_sample += args.sample_s
            if now >= next_reload:
                version += 1
                publish(src, repo, version)
                if version > 2:
                    shutil.rmtree(repo / NAME / str(version - 2))  # keep two versions: memory stays comparable
                deadline = time.monotonic() + 30
                served = 0
                while time.monotonic() < deadline:
                    served = control.get_model(NAME).version
                    if served == version:
                        break
                    time.sleep(0.2)
                versions = list(control.get_model(NAME).available_versions)
                reloads.append({"at_s": round(now - start, 1), "published": version, "served": served,
                                "available": versions, "took_s": round(time.monotonic() - now, 2)})
                next_reload += args.reload_s
            time.sleep(0.2)
    traffic.stop.set()
    for thread in traffic.threads:
        thread.join(90)
    server_codes = scrape_totals(metrics_port, "conceptlens_requests_total", "code")
    front_refusals = scrape_totals(front[1], "conceptlens_front_refusals_total", "method") if front else None

    def window(lo_s: float, hi_s: float, column: int) -> float:
        values = [s[column] for s in samples if lo_s <= s[0] < hi_s]
        return statistics.median(values) if values else float("nan")

    warm = args.warmup_min * 60
    total = args.minutes * 60
    columns = {"server": 1, "tree": 2, **({"front": 3} if front else {})}
    baseline = {key: window(warm, warm + 60, column) for key, column in columns.items()}
    final = {key: window(total - 60, total + 1, column) for key, column in columns.items()}
    return {
        "bench": "soak",
        "minutes": args.minutes, "reload_s": args.reload_s, "warmup_min": args.warmup_min,
        "probe_workers": args.probe_workers,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "client_codes": {m: dict(c) for m, c in traffic.codes.items()},
        "client_internal_or_unknown": sum(c.get("INTERNAL", 0) + c.get("UNKNOWN", 0) for c in traffic.codes.values()),
        "first_unexpected_messages": traffic.messages,
        "server_codes": server_codes,
        "server_internal_or_unknown": server_codes.get("INTERNAL", 0) + server_codes.get("UNKNOWN", 0),
        "front_refusals": front_refusals,
        "reloads": reloads,
        "rss_kb_baseline": baseline, "rss_kb_final": final,
        "rss_growth": {k: final[k] / baseline[k] - 1 for k in baseline},
        "rss_samples": samples,
    }


def report(result: dict) -> None:
    print(f"soak: {result['minutes']:g} min, a reload every {result['reload_s']:g} s, "
          f"load average at end {result['machine']['load_average_at_end'][0]:.1f} on {result['machine']['cpus']} CPUs")
    for method, codes in sorted(result["client_codes"].items()):
        print(f"  {method:8s} " + ", ".join(f"{code} {n}" for code, n in sorted(codes.items())))
    print(f"  INTERNAL/UNKNOWN seen by clients: {result['client_internal_or_unknown']} (target 0); counted by the "
          f"server: {result['server_internal_or_unknown']:g}; tracebacks in the server log: "
          f"{result['server_log_tracebacks']}")
    if result["front_refusals"] is not None:
        refused = ", ".join(f"{m} {n:g}" for m, n in sorted(result["front_refusals"].items()))
        print(f"  through the front; it refused: {refused} (server's RESOURCE_EXHAUSTED "
              f"{result['server_codes'].get('RESOURCE_EXHAUSTED', 0):g})")
    good = sum(1 for r in result["reloads"] if r["served"] == r["published"])
    print(f"  reloads: {good}/{len(result['reloads'])} served the new version "
          f"(slowest {max((r['took_s'] for r in result['reloads']), default=0):.1f} s)")
    for key in result["rss_kb_baseline"]:
        print(f"  RSS {key:6s}: {result['rss_kb_baseline'][key] / 1024:.0f} MiB after warm-up -> "
              f"{result['rss_kb_final'][key] / 1024:.0f} MiB at the end ({result['rss_growth'][key]:+.1%}; "
              "target <= +5%)")
    print(f"  server log: {result['server_log_errors']} ERROR lines, {len(result['server_log_notable'])} "
          "WARNING+ lines kept in the JSON")
    for name, message in result["first_unexpected_messages"].items():
        print(f"  first {name}: {message}")


if __name__ == "__main__":
    sys.exit(main())
