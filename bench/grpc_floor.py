"""The per-call CPU floor of a grpc.aio server, beside ConceptLens's own Predict and refusal costs (issue 14).

Why it matters: under overload every refused call still costs the server one gRPC call's worth of CPU on its
single event-loop thread. Goodput under k x overload is at most about 1 - (k - 1) x refusal cost / call cost of
the server's capacity, so the ratio of those two costs decides how much overload any admission policy can shed.

One run, side by side, each server pinned to one CPU (`--server-cpu`) and the load generator to the others:
  1. a trivial grpc.aio server whose handler returns an empty reply at once ("empty OK");
  2. the same server aborting every call with RESOURCE_EXHAUSTED ("empty refusal");
  3. `conceptlens serve` on the default model: 1-image Predicts below capacity ("Predict OK");
  4. the same server with `--max-inflight predict=1` under a rate it must mostly refuse ("Predict refused");
  5. a trivial *synchronous* gRPC server (`grpc.server(maximum_concurrent_rpcs=1)`) whose one admitted call holds
     the slot, so gRPC's own limit refuses every other call before any handler runs ("sync refusal"): what a
     front that sheds outside the event loop would pay per refused call.
For each: server CPU seconds per call (from /proc/PID/stat), calls by status code.

    .venv/bin/python bench/grpc_floor.py [--rate 1000] [--ok-rate 300] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from conceptlens_client.v1 import conceptlens_service_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import Load, free_port  # sibling bench module: the same load generator

ROOT = Path(__file__).resolve().parents[1]

TRIVIAL_SERVER = """
import asyncio, sys, grpc
refuse = sys.argv[2] == "refuse"
async def handler(request, context):
    if refuse:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    return b""
class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(handler)
async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Handler()])
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


SYNC_SERVER = """
import sys, threading, grpc
from concurrent import futures
hold = threading.Event()
def handler(request, context):
    hold.wait()  # the first call keeps the only slot: gRPC refuses the rest with RESOURCE_EXHAUSTED itself
    return b""
class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(handler)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), maximum_concurrent_rpcs=1)
server.add_generic_rpc_handlers([Handler()])
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def drive(port: int, request: pb.PredictRequest, rate: float, seconds: float) -> Counter:
    """Open-loop Predicts at `rate`/s for `seconds` (1 s deadlines), with overload.py's load generator; their
    status codes."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        load = Load(channel, "Predict", request, deadline=1.0)
        load.open(rate, seconds)
    return Counter(code for _, _, code in load.records)


def measure(name: str, cmd: list[str], port: int, request: pb.PredictRequest, rate: float, seconds: float, cpu: int,
            ready: str) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        while ready not in (line := proc.stdout.readline()):
            if not line and proc.poll() is not None:
                raise RuntimeError(f"{name}: server exited")
        drive(port, request, rate / 4, 1.0)  # warm-up
        before = cpu_seconds(proc.pid)
        codes = drive(port, request, rate, seconds)
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
    calls = sum(codes.values())
    return {"name": name, "rate": rate, "calls": calls, "codes": dict(codes), "server_cpu_s": round(used, 3),
            "cpu_ms_per_call": round(1000 * used / calls, 3) if calls else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="calls/s offered to the refusing servers")
    parser.add_argument("--ok-rate", type=float, default=300.0, help="calls/s offered for the OK measurements")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpc_floor.json")
    args = parser.parse_args(argv)
    others = set(os.sched_getaffinity(0)) - {args.server_cpu}
    if not others:
        parser.error("needs a CPU besides --server-cpu for the load generator")
    os.sched_setaffinity(0, others)

    x = np.zeros((3, 64, 64), np.uint8)
    request = pb.PredictRequest(model="shapes", images=[pb.Image(tensor=pb.Tensor(
        shape=list(x.shape), dtype=pb.Tensor.UINT8, data=x.tobytes()))])
    rows = []
    for mode, rate in (("ok", args.ok_rate), ("refuse", args.rate)):
        port = free_port()
        rows.append(measure(f"empty {'OK' if mode == 'ok' else 'refusal'}",
                            [sys.executable, "-c", TRIVIAL_SERVER, str(port), mode], port, request, rate,
                            args.seconds, args.server_cpu, "ready"))
    port = free_port()
    rows.append(measure("sync refusal", [sys.executable, "-c", SYNC_SERVER, str(port)], port, request, args.rate,
                        args.seconds, args.server_cpu, "ready"))
    for extra, rate, name in (([], args.ok_rate, "Predict OK"),
                              (["--max-inflight", "predict=1", "--max-queue-batches", "0"], args.rate,
                               "Predict refused")):
        port = free_port()
        cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(args.models), "--host", "127.0.0.1",
               "--port", str(port), "--poll", "0", "--threads", "1", "--probe-workers", "0", *extra]
        rows.append(measure(name, cmd, port, request, rate, args.seconds, args.server_cpu, "listening on port"))

    print(f"server pinned to CPU {args.server_cpu}, load generator on {sorted(others)}; load average "
          f"{os.getloadavg()[0]:.1f}")
    for row in rows:
        print(f"{row['name']:<16} {row['rate']:>6.0f}/s offered: {row['cpu_ms_per_call']} ms server CPU per call "
              f"{row['codes']}")
    ok = next(r for r in rows if r["name"] == "Predict OK")["cpu_ms_per_call"]
    refused = next(r for r in rows if r["name"] == "Predict refused")
    # what a refusal costs in the server's own mix (OK calls admitted one at a time, the rest refused)
    n_ok = refused["codes"].get("OK", 0)
    n_re = refused["codes"].get("RESOURCE_EXHAUSTED", 0)
    refusal = (refused["server_cpu_s"] * 1000 - n_ok * ok) / n_re if n_re else float("nan")
    bound = 1 - 3 * refusal / ok
    print(f"Predict refusal ~{refusal:.3f} ms vs Predict OK {ok:.3f} ms: goodput at 4x overload is at most "
          f"~{bound:.2f} of capacity on one core")
    sync = next(r for r in rows if r["name"] == "sync refusal")["cpu_ms_per_call"]
    if sync:
        print(f"a front refusing as gRPC's synchronous server does (~{sync:.3f} ms a call) would allow ~"
              f"{1 - 3 * sync / ok:.2f} of capacity at 4x overload")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "refusal_ms": refusal, "bound_4x": bound,
                                    "load_avg": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
