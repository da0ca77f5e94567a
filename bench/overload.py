"""Overload benchmark (issue 14): does the server shed early and keep its capacity under 4x overload?

The real server runs in a subprocess (`conceptlens serve` on loopback, the default model from `models/`); this
process is the load generator (gRPC futures on pre-serialised requests, replies unparsed: see `Load`), pinned
away from the server's CPUs (`--server-cpus`) so that the two do not share a core.
Phases, each bounded in time:
  1. unloaded: one client, back-to-back Predicts: the unloaded p50 / p99;
  2. capacity: `--clients` closed-loop clients for `--capacity-s` seconds: OK calls/s (a refused client waits
     out the refusal's retry pushback before its next call, as gRPC's retry policy would);
  3. overload: an open-loop arrival rate of `--factor` x capacity for `--duration` seconds, every call with a
     `--deadline` second deadline: goodput (OK calls/s) / capacity, failures by status code, admitted (OK) p99 /
     unloaded p99;
  4. recovery: closed-loop clients again, right after the overload; the time until a 0.5 s window reaches 90% of
     capacity;
  5. probe bursts beside Predict: Predict at half of capacity (open loop) while bursts of Probe calls arrive,
     against the same Predict rate alone: Predict goodput and p99 with and without, and the Probes' codes.
At the end the server's /metrics counts are compared with this client's counts, code by code. Peak RSS is the
server's VmHWM (its probe workers are separate processes, listed beside it).

Every phase runs once per request shape (`--images-per-call`, default 1 and 8 images per Predict), each against a
fresh server. Prints a table per shape and writes bench/results/overload.json. With `--front`, the load goes
through `conceptlens front` (nginx, server/front.py) pinned to the server's CPUs (or `--front-cpus`), which
refuses calls over its per-method in-flight limits before they reach Python; its refusals are added to the
server's counts.

    .venv/bin/python bench/overload.py [--duration 30] [--factor 4] [--deadline 1.0] [--clients 8]
        [--images-per-call 1,8] [--server-cpus 0] [--server-arg=--max-inflight --server-arg=predict=32 ...]
        [--front [--front-limit Predict=16 ...]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from conceptlens.server import front
from conceptlens.server.errors import PUSHBACK_KEY
from conceptlens.server.front_metrics import RefusalLog
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_set(text: str) -> set[int]:
    """'0' or '0,2-3' as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def start_server(models: Path, metrics_port: int, extra: list[str], log,
                 cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(models), "--host", "127.0.0.1",
           "--port", "0", "--poll", "0", "--metrics-port", str(metrics_port), *extra]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # runs in the child
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=pin)
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


def scrape_samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` on http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """conceptlens_requests_total by (method, code)."""
    counts: Counter = Counter()
    for labels, value in scrape_samples(port, "conceptlens_requests_total"):
        counts[(labels["method"], labels["code"])] += value
    return dict(counts)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Load:
    """Calls of one method, recorded as (start time, latency s, status code name).

    The load generator must cost far less per call than the server, or it measures itself: requests are serialised
    once, replies are not parsed (only their status counts), and calls are gRPC futures completed by gRPC's own
    thread, not one asyncio task each.
    """

    def __init__(self, channel: grpc.Channel, method: str, request, deadline: float) -> None:
        self.call = channel.unary_unary(f"/conceptlens.v1.ConceptLens/{method}")  # bytes in, bytes out
        self.request, self.deadline = request.SerializeToString(), deadline
        self.records: list[tuple[float, float, str]] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def start(self, on_done=None) -> None:
        """Send one call; `on_done(pushback_s)` runs when it ends (on gRPC's thread), with the retry pushback of a
        refusal (0 for other codes)."""
        t0 = time.perf_counter()
        with self._lock:
            self._pending += 1

        def done(future: grpc.Future) -> None:
            code = future.code().name
            with self._lock:
                self.records.append((t0, time.perf_counter() - t0, code))
                self._pending -= 1
                self._idle.notify_all()
            if on_done is not None:
                on_done(pushback_s(future) if code == "RESOURCE_EXHAUSTED" else 0.0)

        self.call.future(self.request, timeout=self.deadline).add_done_callback(done)

    def start_later(self, delay_s: float, on_done) -> None:
        """`start(on_done)` after `delay_s`; counted as pending meanwhile, so `wait()` waits for it too."""
        with self._lock:
            self._pending += 1

        def fire() -> None:
            self.start(on_done)
            with self._lock:
                self._pending -= 1

        timer = threading.Timer(delay_s, fire)
        timer.daemon = True
        timer.start()

    def wait(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def closed(self, clients: int, seconds: float) -> None:
        """`clients` callers, each sending its next call when the last one ended, for `seconds`. A refused caller
        first waits out the refusal's retry pushback, as a gRPC client's retry policy would (gRFC A6): callers that
        re-sent at once would spin against the front's limit and measure its refusals rather than capacity."""
        end = time.perf_counter() + seconds

        def again(pushback: float = 0.0) -> None:
            if time.perf_counter() + pushback >= end:
                return
            if pushback > 0:
                self.start_later(pushback, again)
            else:
                self.start(again)

        for _ in range(clients):
            self.start(again)
        time.sleep(seconds)
        self.wait()

    def open(self, rate: float, seconds: float) -> float:
        """Arrivals at `rate` per second for `seconds` (independent of completions); returns the rate achieved."""
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * rate) - sent
            for _ in range(max(0, due)):
                self.start()
            sent += max(0, due)
            time.sleep(0.001)
        achieved = sent / (time.perf_counter() - start)
        self.wait()
        return achieved

    def since(self, t0: float) -> list[tuple[float, float, str]]:
        return [r for r in self.records if r[0] >= t0]


def pushback_s(future: grpc.Future) -> float:
    """The retry pushback trailer (`grpc-retry-pushback-ms`) of a finished call in seconds (0 when absent or
    negative)."""
    try:
        ms = int(dict(future.trailing_metadata() or ()).get(PUSHBACK_KEY, "0"))
    except ValueError:
        return 0.0
    return max(ms, 0) / 1000


def summary(records: list[tuple[float, float, str]], seconds: float) -> dict:
    codes = Counter(code for _, _, code in records)
    ok = [lat for _, lat, code in records if code == "OK"]
    failed = sum(n for code, n in codes.items() if code != "OK")
    return {"calls": len(records), "ok_per_s": len(ok) / seconds, "codes": dict(codes),
            "p50_ms": pct(ok, 50) * 1000, "p99_ms": pct(ok, 99) * 1000,
            "shed_resource_exhausted": codes.get("RESOURCE_EXHAUSTED", 0) / failed if failed else None}


def recovery(load: Load, clients: int, capacity: float, limit_s: float = 20.0, window_s: float = 0.5) -> float:
    """Seconds from now until a `window_s` window of closed-loop calls reaches 90% of `capacity` (or `limit_s`)."""
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < limit_s:
        t0 = time.perf_counter()
        load.closed(clients, window_s)
        ok = sum(1 for r in load.since(t0) if r[2] == "OK")
        if ok / (time.perf_counter() - t0) >= 0.9 * capacity:
            return time.perf_counter() - start
    return elapsed


def first_model_request(channel: grpc.Channel, images_per_call: int) -> tuple[pb.Model, pb.Image, pb.PredictRequest]:
    """The repository's first model (ListModels), one random uint8 image of its input shape, and a Predict of
    `images_per_call` copies of that image: what the overload benches send."""
    model = pb_grpc.ConceptLensStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models[0]
    size, channels = model.input.size, model.input.channels
    x = np.random.default_rng(0).integers(0, 256, (channels, size, size), dtype=np.uint8)
    image = pb.Image(tensor=pb.Tensor(shape=list(x.shape), dtype=pb.Tensor.UINT8, data=x.tobytes()))
    return model, image, pb.PredictRequest(model=model.model, images=[image] * images_per_call)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags the overload benches share: the model repository, the overload and the capacity clients."""
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="model repository (default: models/)")
    parser.add_argument("--factor", type=float, default=4.0, help="overload arrival rate / capacity (default 4)")
    parser.add_argument("--deadline", type=float, default=1.0, help="deadline of each overload call, s (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients for capacity (default 8)")


def run(args: argparse.Namespace, port: int, images_per_call: int, backend_port: int | None = None) -> dict:
    """Every phase against `port`; with a front, `backend_port` is the server behind it, whose own capacity is
    measured too: nginx adds a hop (and by default shares the server's CPUs), and this says what that costs."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        model, image, predict = first_model_request(channel, images_per_call)
        size, channels = model.input.size, model.input.channels
        out: dict = {"model": model.name,
                     "input": f"{channels}x{size}x{size} uint8 tensor, {images_per_call} image(s) per call"}

        warm = Load(channel, "Predict", predict, 10.0)
        warm.closed(args.clients, 2.0)  # warm-up: sessions, batchers, moving averages

        unloaded = Load(channel, "Predict", predict, 10.0)
        unloaded.closed(1, args.unloaded_s)
        out["unloaded"] = summary(unloaded.records, args.unloaded_s)

        cap = Load(channel, "Predict", predict, 10.0)
        cap.closed(args.clients, args.capacity_s)
        out["capacity"] = summary(cap.records, args.capacity_s)
        capacity = out["capacity"]["ok_per_s"]
        direct = None
        if backend_port is not None:
            with grpc.insecure_channel(f"127.0.0.1:{backend_port}") as backend:
                direct = Load(backend, "Predict", predict, 10.0)
                direct.closed(args.clients, args.capacity_s)
            out["capacity_without_front"] = summary(direct.records, args.capacity_s)

        over = Load(channel, "Predict", predict, args.deadline)
        rate = args.factor * capacity
        achieved = over.open(rate, args.duration)
        out["overload"] = summary(over.records, args.duration)
        out["overload"].update(offered_per_s=rate, achieved_offered_per_s=achieved)

        rec = Load(channel, "Predict", predict, args.deadline)
        out["recovery_s"] = recovery(rec, args.clients, capacity)

        # Probe bursts beside Predict at half capacity: the same Predict stream alone, then with the bursts
        alone = Load(channel, "Predict", predict, args.deadline)
        alone.open(capacity / 2, args.probe_s)
        out["predict_alone"] = summary(alone.records, args.probe_s)
        beside = Load(channel, "Predict", predict, args.deadline)
        probe_request = pb.ProbeRequest(model=model.model, images=[image], attack=pb.AttackSpec(
            kind=pb.AttackSpec.PGD, epsilon=8 / 255, steps=10))
        probes = Load(channel, "Probe", probe_request, args.probe_deadline)

        def bursts() -> None:
            end = time.perf_counter() + args.probe_s
            while time.perf_counter() < end:
                for _ in range(args.probe_burst):
                    probes.start()
                probes.wait()
                time.sleep(0.5)

        burst_thread = threading.Thread(target=bursts)
        burst_thread.start()
        beside.open(capacity / 2, args.probe_s)
        burst_thread.join()
        out["predict_beside_probes"] = summary(beside.records, args.probe_s)
        out["probes"] = summary(probes.records, args.probe_s)

        client_counts: Counter = Counter()
        for load, method in ((warm, "Predict"), (unloaded, "Predict"), (cap, "Predict"), (over, "Predict"),
                             (rec, "Predict"), (alone, "Predict"), (beside, "Predict"), (probes, "Probe"),
                             (direct, "Predict")):
            if load is not None:
                client_counts.update((method, code) for _, _, code in load.records)
        out["client_counts"] = {f"{m} {c}": n for (m, c), n in sorted(client_counts.items())}
        return out


def measure(args: argparse.Namespace, images_per_call: int, server_args: list[str], server_cpus: set[int],
            with_front: bool) -> dict:
    """Every phase against a fresh server, for one request shape; the ratios and the count comparison."""
    metrics_port = free_port()
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryDirectory() as front_dir:
        proc, port = start_server(args.models, metrics_port, server_args, log, server_cpus or None)
        nginx, backend_port = None, None
        try:
            if with_front:  # nginx in front (on the server's CPUs unless --front-cpus): the load goes to it
                cfg = front.FrontConfig(listen=f"127.0.0.1:{free_port()}", backend=f"127.0.0.1:{port}",
                                        directory=Path(front_dir), limits=front.parse_limits(args.front_limit))
                front_cpus = args.front_cpu_set if args.front_cpu_set is not None else server_cpus
                pin = (lambda: os.sched_setaffinity(0, front_cpus)) if front_cpus else None
                nginx = front.start(cfg, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=pin)
                backend_port, port = port, int(cfg.listen.rsplit(":", 1)[1])
            time.sleep(2.0)  # the probe worker imports torch beside the server; let it settle
            result = run(args, port, images_per_call, backend_port=backend_port)
            time.sleep(0.5)  # the server counts a call after its status is sent
            server_counts = scrape(metrics_port)
            if nginx is not None:  # calls the front refused never reached the server
                counts = RefusalLog(Path(front_dir)).counts()
                refused = {m: counts.get(m, 0) for m in ("Predict", "Probe")}
                result["front_refusals"] = refused
                for method, n in refused.items():
                    if n:
                        key = (method, "RESOURCE_EXHAUSTED")
                        server_counts[key] = server_counts.get(key, 0) + n
            result["server_counts"] = {f"{m} {c}": n for (m, c), n in sorted(server_counts.items())}
            workers = [peak_rss_mb(c) for c in children(proc.pid)]  # a worker restarting may not report yet
            result["peak_rss_mb"] = {"server": peak_rss_mb(proc.pid), "probe_workers": [m for m in workers if m > 0]}
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(30)
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        lines = log.read().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")]
        result["server_log"] = {"lines": len(lines), "error_lines": len(errors), "first_error": errors[:1]}

    cap, over = result["capacity"], result["overload"]
    result["ratios"] = {
        "goodput_over_capacity": over["ok_per_s"] / cap["ok_per_s"],
        "shed_resource_exhausted_share_of_failures": over["shed_resource_exhausted"],
        "admitted_p99_over_unloaded_p99": over["p99_ms"] / result["unloaded"]["p99_ms"],
        "goodput_over_capacity_without_front": over["ok_per_s"] / result["capacity_without_front"]["ok_per_s"]
        if "capacity_without_front" in result else None,
        "predict_p99_beside_probes_over_alone": result["predict_beside_probes"]["p99_ms"]
        / result["predict_alone"]["p99_ms"],
        "predict_goodput_beside_probes_over_alone": result["predict_beside_probes"]["ok_per_s"]
        / result["predict_alone"]["ok_per_s"],
    }
    client, server = result["client_counts"], result["server_counts"]
    result["count_mismatches"] = {k: (client.get(k, 0), server.get(k, 0)) for k in set(client) | set(server)
                                  if k.split()[0] in ("Predict", "Probe") and client.get(k, 0) != server.get(k, 0)}
    result["load_avg_after"] = os.getloadavg()
    return result


def report(args: argparse.Namespace, result: dict) -> None:
    cap, over, unloaded, r = result["capacity"], result["overload"], result["unloaded"], result["ratios"]
    via = " through `conceptlens front`" if "front_refusals" in result else ", straight to the server"
    print(f"\n== model {result['model']}, {result['input']}{via} (load average {result['load_avg_after'][0]:.1f} "
          "after)")
    print(f"unloaded (1 client):   p50 {unloaded['p50_ms']:.1f} ms, p99 {unloaded['p99_ms']:.1f} ms")
    print(f"capacity ({args.clients} clients): {cap['ok_per_s']:.0f} calls/s, p99 {cap['p99_ms']:.1f} ms")
    print(f"overload {args.factor:g}x for {args.duration:g} s, {args.deadline:g} s deadlines: offered "
          f"{over['offered_per_s']:.0f}/s (achieved {over['achieved_offered_per_s']:.0f}/s), codes {over['codes']}")
    print(f"  goodput / capacity        {r['goodput_over_capacity']:.2f}   (target >= 0.8)")
    if r["goodput_over_capacity_without_front"] is not None:
        own = result["capacity_without_front"]["ok_per_s"]
        print(f"  goodput / the server's own capacity without the front ({own:.0f} calls/s) "
              f"{r['goodput_over_capacity_without_front']:.2f}")
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
    front_note = f" (front refusals added: {result['front_refusals']})" if "front_refusals" in result else ""
    print(f"client vs server counts{front_note}: {result['count_mismatches'] or 'identical'}")
    print(f"server log: {result['server_log']['lines']} lines, {result['server_log']['error_lines']} ERROR "
          f"{result['server_log']['first_error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_load_arguments(parser)
    parser.add_argument("--duration", type=float, default=30.0, help="overload seconds (default 30)")
    parser.add_argument("--capacity-s", type=float, default=10.0, help="capacity phase seconds (default 10)")
    parser.add_argument("--unloaded-s", type=float, default=5.0, help="unloaded phase seconds (default 5)")
    parser.add_argument("--probe-s", type=float, default=10.0, help="each probe-burst phase, seconds (default 10)")
    parser.add_argument("--probe-burst", type=int, default=16, help="Probe calls per burst (default 16)")
    parser.add_argument("--probe-deadline", type=float, default=5.0, help="Probe deadline, s (default 5)")
    parser.add_argument("--images-per-call", default="1,8",
                        help="request shapes measured one after the other, each against a fresh server: images per "
                             "Predict, comma-separated (default 1,8)")
    default_server = "0" if (os.cpu_count() or 1) >= 2 else ""
    parser.add_argument("--server-cpus", default=default_server,
                        help="CPUs the server (and its probe workers) may use, e.g. 0 or 0-1; '' = no pinning "
                             f"(default {default_server!r}: the load generator gets the other CPUs, so it cannot "
                             "starve the server it measures)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `conceptlens serve` argument (repeat; use --server-arg=--flag for flags)")
    has_nginx = front.nginx_binary() is not None
    parser.add_argument("--front", choices=("off", "on", "both"), default="both" if has_nginx else "off",
                        help="send the load straight to the server (off), through `conceptlens front` (nginx, pinned "
                             "to the server's CPUs unless --front-cpus; on), or measure both side by side (default: "
                             "both where nginx is installed, else off)")
    parser.add_argument("--front-cpus", default=None,
                        help="CPUs nginx may use (default: the server's, so the front's cost comes out of the "
                             "server's CPU); e.g. the load generator's, as a sidecar with its own CPU request")
    parser.add_argument("--front-limit", action="append", default=[], metavar="METHOD=N",
                        help="the front's in-flight limit per method (repeat; default "
                             + ", ".join(f"{m}={n}" for m, n in front.DEFAULT_LIMITS.items()) + ")")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = parser.parse_args(argv)
    if args.front != "off" and not has_nginx:
        parser.error("--front needs an nginx binary on PATH (Debian: apt-get install nginx-light)")
    shapes = [int(v) for v in args.images_per_call.split(",") if v.strip()]

    for flag, text in (("--server-cpus", args.server_cpus), ("--front-cpus", args.front_cpus or "")):
        try:
            cpu_set(text)
        except ValueError:
            parser.error(f"{flag}: expected CPU numbers such as 0 or 0,2-3, got {text!r}")
    server_cpus = cpu_set(args.server_cpus) if hasattr(os, "sched_setaffinity") else set()
    pinning = hasattr(os, "sched_setaffinity")
    args.front_cpu_set = cpu_set(args.front_cpus) if args.front_cpus is not None and pinning else None
    server_args = list(args.server_arg)
    if server_cpus:
        client_cpus = set(os.sched_getaffinity(0)) - server_cpus
        if not client_cpus:
            parser.error(f"--server-cpus {args.server_cpus} leaves no CPU for the load generator")
        os.sched_setaffinity(0, client_cpus)
        if not any(a.startswith("--threads") for a in server_args):  # ONNX Runtime: one thread per pinned CPU
            server_args += [f"--threads={len(server_cpus)}"]
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_before": os.getloadavg(),
               "server_args": server_args, "server_cpus": sorted(server_cpus), "front": args.front,
               "front_cpus": sorted(args.front_cpu_set) if args.front_cpu_set is not None else None,
               "front_limits": front.parse_limits(args.front_limit) if args.front != "off" else None,
               "client_cpus": sorted(os.sched_getaffinity(0)) if server_cpus else None}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before; server on CPUs "
          f"{machine['server_cpus'] or 'any'}, load generator on {machine['client_cpus'] or 'any'}, front (if any) "
          f"on {machine['front_cpus'] or 'the same as the server'}; server args {' '.join(server_args) or 'none'}")
    results = {}
    fronts = {"off": [False], "on": [True], "both": [False, True]}[args.front]
    for n in shapes:
        for with_front in fronts:
            key = f"{n} through the front" if with_front else str(n)
            results[key] = measure(args, n, server_args, server_cpus, with_front)
            report(args, results[key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "images_per_call": results}, indent=2))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
