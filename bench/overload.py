"""Overload benchmark (issue 14): does the server shed early and keep its capacity under 4x overload?

The real server runs in a subprocess (`conceptlens serve` on loopback, the default model from `models/`); this
process is the load generator (grpc.aio, one call per image, raw tensors so client-side encoding is cheap).
Phases, each bounded in time:
  1. unloaded: one client, back-to-back Predicts: the unloaded p50 / p99;
  2. capacity: `--clients` closed-loop clients for `--capacity-s` seconds: OK calls/s;
  3. overload: an open-loop arrival rate of `--factor` x capacity for `--duration` seconds, every call with a
     `--deadline` second deadline: goodput (OK calls/s) / capacity, failures by status code, admitted (OK) p99 /
     unloaded p99;
  4. recovery: closed-loop clients again, right after the overload; the time until a 0.5 s window reaches 90% of
     capacity;
  5. probe bursts beside Predict: Predict at half of capacity (open loop) while bursts of Probe calls arrive,
     against the same Predict rate alone: Predict goodput and p99 with and without, and the Probes' codes.
At the end the server's /metrics counts are compared with this client's counts, code by code. Peak RSS is the
server's VmHWM (its probe workers are separate processes, listed beside it).

Prints a table and writes bench/results/overload.json.

    nice -n 10 .venv/bin/python bench/overload.py [--duration 30] [--factor 4] [--deadline 1.0] [--clients 8]
        [--server-arg=--max-inflight --server-arg=predict=32 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: Path, metrics_port: int, extra: list[str], log) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(models), "--host", "127.0.0.1",
           "--port", "0", "--poll", "0", "--metrics-port", str(metrics_port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if "listening on port" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.rsplit(" ", 1)[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid` in MB (0 where /proc is missing)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match[1]) / 1024 if match else 0.0


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return out


def scrape(port: int) -> dict[tuple[str, str], float]:
    """conceptlens_requests_total by (method, code)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("conceptlens_requests_total{"):
            method = re.search(r'method="([^"]*)"', line)[1]
            code = re.search(r'code="([^"]*)"', line)[1]
            counts[(method, code)] += float(line.rsplit(" ", 1)[1])
    return dict(counts)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Load:
    """Calls of one kind, recorded as (start time, latency s, status code name)."""

    def __init__(self, stub: pb_grpc.ConceptLensStub, method: str, request, deadline: float) -> None:
        self.call = getattr(stub, method)
        self.request, self.deadline = request, deadline
        self.records: list[tuple[float, float, str]] = []

    async def one(self) -> None:
        start = time.perf_counter()
        try:
            await self.call(self.request, timeout=self.deadline)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        self.records.append((start, time.perf_counter() - start, code))

    async def closed(self, clients: int, seconds: float) -> None:
        end = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                await self.one()

        await asyncio.gather(*(client() for _ in range(clients)))

    async def open(self, rate: float, seconds: float) -> float:
        """Arrivals at `rate` per second for `seconds` (independent of completions); returns the rate achieved."""
        start = time.perf_counter()
        tasks: set[asyncio.Task] = set()
        sent = 0
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * rate) - sent
            for _ in range(max(0, due)):
                task = asyncio.create_task(self.one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent += max(0, due)
            await asyncio.sleep(0.001)
        achieved = sent / (time.perf_counter() - start)
        if tasks:
            await asyncio.wait(tasks)
        return achieved

    def since(self, t0: float) -> list[tuple[float, float, str]]:
        return [r for r in self.records if r[0] >= t0]


def summary(records: list[tuple[float, float, str]], seconds: float) -> dict:
    codes = Counter(code for _, _, code in records)
    ok = [lat for _, lat, code in records if code == "OK"]
    failed = sum(n for code, n in codes.items() if code != "OK")
    return {"calls": len(records), "ok_per_s": len(ok) / seconds, "codes": dict(codes),
            "p50_ms": pct(ok, 50) * 1000, "p99_ms": pct(ok, 99) * 1000,
            "shed_resource_exhausted": codes.get("RESOURCE_EXHAUSTED", 0) / failed if failed else None}


async def recovery(load: Load, clients: int, capacity: float, limit_s: float = 20.0, window_s: float = 0.5) -> float:
    """Seconds from now until a `window_s` window of closed-loop calls reaches 90% of `capacity` (or `limit_s`)."""
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < limit_s:
        t0 = time.perf_counter()
        await load.closed(clients, window_s)
        ok = sum(1 for r in load.since(t0) if r[2] == "OK")
        if ok / (time.perf_counter() - t0) >= 0.9 * capacity:
            return time.perf_counter() - start
    return elapsed


async def run(args: argparse.Namespace, port: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ConceptLensStub(channel)
        model = (await stub.ListModels(pb.ListModelsRequest(), timeout=30)).models[0]
        size, channels = model.input.size, model.input.channels
        x = np.random.default_rng(0).integers(0, 256, (channels, size, size), dtype=np.uint8)
        image = pb.Image(tensor=pb.Tensor(shape=list(x.shape), dtype=pb.Tensor.UINT8, data=x.tobytes()))
        predict = pb.PredictRequest(model=model.model, images=[image])
        out: dict = {"model": model.name, "input": f"{channels}x{size}x{size} uint8 tensor, 1 image per call"}

        warm = Load(stub, "Predict", predict, 10.0)
        await warm.closed(args.clients, 2.0)  # warm-up: sessions, batchers, moving averages

        unloaded = Load(stub, "Predict", predict, 10.0)
        await unloaded.closed(1, args.unloaded_s)
        out["unloaded"] = summary(unloaded.records, args.unloaded_s)

        cap = Load(stub, "Predict", predict, 10.0)
        await cap.closed(args.clients, args.capacity_s)
        out["capacity"] = summary(cap.records, args.capacity_s)
        capacity = out["capacity"]["ok_per_s"]

        over = Load(stub, "Predict", predict, args.deadline)
        rate = args.factor * capacity
        achieved = await over.open(rate, args.duration)
        out["overload"] = summary(over.records, args.duration)
        out["overload"].update(offered_per_s=rate, achieved_offered_per_s=achieved)

        rec = Load(stub, "Predict", predict, args.deadline)
        out["recovery_s"] = await recovery(rec, args.clients, capacity)

        # Probe bursts beside Predict at half capacity: the same Predict stream alone, then with the bursts
        alone = Load(stub, "Predict", predict, args.deadline)
        await alone.open(capacity / 2, args.probe_s)
        out["predict_alone"] = summary(alone.records, args.probe_s)
        beside = Load(stub, "Predict", predict, args.deadline)
        probe_request = pb.ProbeRequest(model=model.model, images=[image], attack=pb.AttackSpec(
            kind=pb.AttackSpec.PGD, epsilon=8 / 255, steps=10))
        probes = Load(stub, "Probe", probe_request, args.probe_deadline)

        async def bursts() -> None:
            end = time.perf_counter() + args.probe_s
            while time.perf_counter() < end:
                await asyncio.gather(*(probes.one() for _ in range(args.probe_burst)))
                await asyncio.sleep(0.5)

        await asyncio.gather(beside.open(capacity / 2, args.probe_s), bursts())
        out["predict_beside_probes"] = summary(beside.records, args.probe_s)
        out["probes"] = summary(probes.records, args.probe_s)

        client_counts: Counter = Counter()
        for load, method in ((warm, "Predict"), (unloaded, "Predict"), (cap, "Predict"), (over, "Predict"),
                             (rec, "Predict"), (alone, "Predict"), (beside, "Predict"), (probes, "Probe")):
            client_counts.update((method, code) for _, _, code in load.records)
        out["client_counts"] = {f"{m} {c}": n for (m, c), n in sorted(client_counts.items())}
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="model repository (default: models/)")
    parser.add_argument("--duration", type=float, default=30.0, help="overload seconds (default 30)")
    parser.add_argument("--factor", type=float, default=4.0, help="overload arrival rate / capacity (default 4)")
    parser.add_argument("--deadline", type=float, default=1.0, help="deadline of each overload call, s (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients for capacity (default 8)")
    parser.add_argument("--capacity-s", type=float, default=10.0, help="capacity phase seconds (default 10)")
    parser.add_argument("--unloaded-s", type=float, default=5.0, help="unloaded phase seconds (default 5)")
    parser.add_argument("--probe-s", type=float, default=10.0, help="each probe-burst phase, seconds (default 10)")
    parser.add_argument("--probe-burst", type=int, default=16, help="Probe calls per burst (default 16)")
    parser.add_argument("--probe-deadline", type=float, default=5.0, help="Probe deadline, s (default 5)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `conceptlens serve` argument (repeat; use --server-arg=--flag for flags)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = parser.parse_args(argv)

    metrics_port = free_port()
    with tempfile.TemporaryFile("w+") as log:  # the server's log: its error lines are counted below
        proc, port = start_server(args.models, metrics_port, args.server_arg, log)
        try:
            time.sleep(2.0)  # the probe worker imports torch beside the server; let it settle
            result = asyncio.run(run(args, port))
            time.sleep(0.5)  # the server counts a call after its status is sent
            server_counts = scrape(metrics_port)
            result["server_counts"] = {f"{m} {c}": n for (m, c), n in sorted(server_counts.items())}
            workers = [peak_rss_mb(c) for c in children(proc.pid)]  # a worker restarting may not report yet
            result["peak_rss_mb"] = {"server": peak_rss_mb(proc.pid), "probe_workers": [m for m in workers if m > 0]}
        finally:
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        lines = log.read().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")]
        result["server_log"] = {"lines": len(lines), "error_lines": len(errors), "first_error": errors[:1]}

    cap, over = result["capacity"], result["overload"]
    unloaded = result["unloaded"]
    result["ratios"] = {
        "goodput_over_capacity": over["ok_per_s"] / cap["ok_per_s"],
        "shed_resource_exhausted_share_of_failures": over["shed_resource_exhausted"],
        "admitted_p99_over_unloaded_p99": over["p99_ms"] / unloaded["p99_ms"],
        "predict_p99_beside_probes_over_alone": result["predict_beside_probes"]["p99_ms"]
        / result["predict_alone"]["p99_ms"],
        "predict_goodput_beside_probes_over_alone": result["predict_beside_probes"]["ok_per_s"]
        / result["predict_alone"]["ok_per_s"],
    }
    mismatch = {k: (result["client_counts"].get(k, 0), result["server_counts"].get(k, 0))
                for k in set(result["client_counts"]) | set(result["server_counts"])
                if k.split()[0] in ("Predict", "Probe")
                and result["client_counts"].get(k, 0) != result["server_counts"].get(k, 0)}
    result["count_mismatches"] = mismatch
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg(),
                         "server_args": args.server_arg}

    r = result["ratios"]
    print(f"model {result['model']} ({result['input']}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"unloaded (1 client):   p50 {unloaded['p50_ms']:.1f} ms, p99 {unloaded['p99_ms']:.1f} ms")
    print(f"capacity ({args.clients} clients): {cap['ok_per_s']:.0f} calls/s, p99 {cap['p99_ms']:.1f} ms")
    print(f"overload {args.factor:g}x for {args.duration:g} s, {args.deadline:g} s deadlines: offered "
          f"{over['offered_per_s']:.0f}/s (achieved {over['achieved_offered_per_s']:.0f}/s), codes {over['codes']}")
    print(f"  goodput / capacity        {r['goodput_over_capacity']:.2f}   (target >= 0.8)")
    shed = r["shed_resource_exhausted_share_of_failures"]
    print(f"  RESOURCE_EXHAUSTED share of failures {shed if shed is None else f'{shed:.3f}'}   (target >= 0.95)")
    print(f"  admitted p99 / unloaded p99 {r['admitted_p99_over_unloaded_p99']:.2f}   (target <= 5; admitted p99 "
          f"{over['p99_ms']:.1f} ms)")
    print(f"recovery to 90% of capacity: {result['recovery_s']:.2f} s")
    print(f"probe bursts ({args.probe_burst} PGD-10 every 0.5 s after the last): Predict at half capacity p99 "
          f"{result['predict_alone']['p99_ms']:.1f} -> {result['predict_beside_probes']['p99_ms']:.1f} ms "
          f"(x{r['predict_p99_beside_probes_over_alone']:.2f}), goodput "
          f"x{r['predict_goodput_beside_probes_over_alone']:.2f}; probe codes {result['probes']['codes']}")
    print(f"peak RSS: server {result['peak_rss_mb']['server']:.0f} MB, probe workers "
          f"{', '.join(f'{m:.0f}' for m in result['peak_rss_mb']['probe_workers'])} MB")
    print(f"client vs server counts: {mismatch or 'identical'}")
    print(f"server log: {result['server_log']['lines']} lines, {result['server_log']['error_lines']} ERROR "
          f"{result['server_log']['first_error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
