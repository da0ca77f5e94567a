"""Paired overload rounds (issue 14): goodput through the front against the bare server's capacity, with the
machine's drift taken out.

`bench/overload.py` measures the bare server's capacity once and the overload through the front once, minutes
apart on a fresh server per shape. On a machine whose speed drifts by a fifth between runs, that one ratio is
mostly drift. Here one server runs behind several fronts at once, one per (placement, Predict limit), and every
round measures the bare server's capacity (`--clients` closed-loop clients, straight to it) and, right after, a
`--factor` x overload through each front in turn (the order rotates each round). Each front's goodput is divided
by the capacity of its own round, so drift between rounds cancels.

Placements: `shared`, nginx on the server's CPUs (its cost comes out of the server's core); `own`, nginx on the
load generator's CPUs, as the Kubernetes sidecar with its own CPU request (on a 2-CPU machine it shares that CPU
with the load generator). The server runs without probe workers (`--probe-workers 0`): only Predict is measured,
and a worker importing torch beside the server would disturb the first rounds.

Per front: goodput / bare capacity, admitted p99 / its placement's unloaded p99 (one client through each of the
placement's fronts, pooled: the limit never binds at one client), and the RESOURCE_EXHAUSTED share of
failures, each as the mean over rounds with a bootstrap 95% interval over rounds (training/stats.py); and per
placement, each limit minus the first, round by round (a paired difference: does the larger limit buy goodput,
and what does it cost in p99). Ten rounds make a rough interval; a bootstrap over so few is a little narrow.

    .venv/bin/python bench/front_paired.py [--rounds 10] [--limits 3,4] [--placements shared,own]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc

from conceptlens.server import front
from conceptlens.training.stats import bootstrap_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import ROOT, Load, add_load_arguments, cpu_set, first_model_request, free_port, start_server, summary

PLACEMENTS = ("shared", "own")
GOODPUT_TARGET, P99_TARGET = 0.8, 5.0  # issue 14: goodput / capacity >= 0.8, admitted p99 / unloaded p99 <= 5


def start_front(stack: ExitStack, backend_port: int, limit: int, cpus: set[int], log) -> int:
    """nginx in front of the server with a Predict limit of `limit`, pinned to `cpus`; its listening port."""
    cfg = front.FrontConfig(listen=f"127.0.0.1:{free_port()}", backend=f"127.0.0.1:{backend_port}",
                            directory=Path(stack.enter_context(tempfile.TemporaryDirectory())),
                            limits=front.parse_limits([f"Predict={limit}"]))
    nginx = front.start(cfg, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    stack.callback(lambda: (nginx.terminate(), nginx.wait(30)))
    return int(cfg.listen.rsplit(":", 1)[1])


def holding_limits(results: dict[str, dict], placement: str, limits: list[int]) -> list[int]:
    """The limits at `placement` whose mean goodput / bare capacity and mean p99 ratio both meet the targets. The
    right limit depends on what a call costs beside the hop through nginx (bench/README.md, "The limit depends on
    what a call costs"), so this is the line to read when choosing one for a deployment."""
    return [limit for limit in limits
            if results[f"{placement} limit {limit}"]["goodput_over_capacity"]["value"] >= GOODPUT_TARGET
            and results[f"{placement} limit {limit}"]["p99_over_unloaded"]["value"] <= P99_TARGET]


def placement_of(name: str) -> str:
    """'own limit 4' -> 'own'; 'bare' -> 'bare'."""
    return name.split(" limit ")[0]


def interval(values: list[float]) -> dict[str, float]:
    return bootstrap_mean([v for v in values if v is not None]).to_json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add_load_arguments(parser)
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds (default 10)")
    parser.add_argument("--limits", default="3,4", help="the fronts' Predict limits, comma-separated (default 3,4)")
    parser.add_argument("--placements", default="shared,own",
                        help="where nginx runs: shared (the server's CPUs), own (the load generator's); default both")
    parser.add_argument("--images-per-call", type=int, default=1, help="images per Predict (default 1)")
    parser.add_argument("--capacity-s", type=float, default=5.0, help="capacity phase of a round, s (default 5)")
    parser.add_argument("--overload-s", type=float, default=8.0, help="overload phase per front, s (default 8)")
    parser.add_argument("--unloaded-s", type=float, default=4.0, help="unloaded phase per front, s (default 4)")
    parser.add_argument("--server-cpus", default="0", help="CPUs of the server (default 0; the rest load it)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "front_paired.json")
    args = parser.parse_args(argv)
    if front.nginx_binary() is None:
        parser.error("needs an nginx binary on PATH (Debian: apt-get install nginx-light)")
    try:
        limits = [int(v) for v in args.limits.split(",") if v.strip()]
        server_cpus = cpu_set(args.server_cpus)
    except ValueError:
        parser.error(f"--limits and --server-cpus take integers, got {args.limits!r} and {args.server_cpus!r}")
    placements = [p for p in args.placements.split(",") if p.strip()]
    if not limits or min(limits) < 1 or not placements or set(placements) - set(PLACEMENTS):
        parser.error(f"--limits: integers >= 1; --placements: some of {', '.join(PLACEMENTS)}")
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 for an interval")
    client_cpus = set(os.sched_getaffinity(0)) - server_cpus
    if not server_cpus or not client_cpus:
        parser.error(f"--server-cpus {args.server_cpus!r} must leave a CPU for the load generator")
    os.sched_setaffinity(0, client_cpus)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; server on {sorted(server_cpus)}, load "
          f"generator on {sorted(client_cpus)}; {args.images_per_call} image(s) per Predict; {args.rounds} rounds")

    with ExitStack() as stack:
        log = stack.enter_context(tempfile.TemporaryFile("w+"))
        proc, port = start_server(args.models, free_port(), [f"--threads={len(server_cpus)}", "--probe-workers=0"],
                                  log, server_cpus)
        stack.callback(lambda: (proc.terminate(), proc.wait(30)))
        channels = {"bare": stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}"))}
        _, _, request = first_model_request(channels["bare"], args.images_per_call)
        for placement in placements:
            cpus = server_cpus if placement == "shared" else client_cpus
            for limit in limits:
                front_port = start_front(stack, port, limit, cpus, log)
                channels[f"{placement} limit {limit}"] = stack.enter_context(
                    grpc.insecure_channel(f"127.0.0.1:{front_port}"))
        time.sleep(2.0)
        fronts = [name for name in channels if name != "bare"]
        unloaded, pooled = {}, {}
        for name, channel in channels.items():
            Load(channel, "Predict", request, 10.0).closed(args.clients, 1.0)  # warm-up
            probe = Load(channel, "Predict", request, 10.0)
            probe.closed(1, args.unloaded_s)
            unloaded[name] = summary(probe.records, args.unloaded_s)["p99_ms"]
            pooled.setdefault(placement_of(name), []).extend(probe.records)
        # One denominator per placement: with one client a front's limit never binds, so its fronts measure the same
        # thing, and a p99 of one 4 s sample per front moved by half between fronts (2.9 vs 4.7 ms), which made
        # limit-vs-limit p99 differences mostly the denominators'.
        baseline = {placement: summary(records, args.unloaded_s)["p99_ms"] for placement, records in pooled.items()}
        print("unloaded p99: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in unloaded.items())
              + "; per placement, pooled: " + ", ".join(f"{p} {ms:.1f} ms" for p, ms in baseline.items()))

        rounds = []
        for r in range(args.rounds):
            cap_load = Load(channels["bare"], "Predict", request, 10.0)
            cap_load.closed(args.clients, args.capacity_s)
            capacity = summary(cap_load.records, args.capacity_s)["ok_per_s"]
            row = {"capacity": capacity, "fronts": {}}
            order = fronts[r % len(fronts):] + fronts[:r % len(fronts)]
            for name in order:
                over = Load(channels[name], "Predict", request, args.deadline)
                achieved = over.open(args.factor * capacity, args.overload_s)
                s = summary(over.records, args.overload_s)
                row["fronts"][name] = {"goodput": s["ok_per_s"], "goodput_over_capacity": s["ok_per_s"] / capacity,
                                       "p99_ms": s["p99_ms"],
                                       "p99_over_unloaded": s["p99_ms"] / baseline[placement_of(name)],
                                       "shed_resource_exhausted": s["shed_resource_exhausted"],
                                       "offered": args.factor * capacity, "achieved": achieved, "codes": s["codes"]}
            rounds.append(row)
            print(f"round {r + 1}: bare capacity {capacity:.0f} calls/s; " + "; ".join(
                f"{name} {f['goodput']:.0f} = {f['goodput_over_capacity']:.2f}, p99 x{f['p99_over_unloaded']:.1f}"
                for name, f in row["fronts"].items()), flush=True)

    results = {}
    print(f"\nmean over {args.rounds} rounds [95% interval]   (targets: goodput / capacity >= {GOODPUT_TARGET}, "
          f"admitted p99 / unloaded p99 <= {P99_TARGET:g}, RESOURCE_EXHAUSTED share >= 0.95)")
    for name in fronts:
        per = [row["fronts"][name] for row in rounds]
        results[name] = {key: interval([f[key] for f in per])
                         for key in ("goodput_over_capacity", "p99_over_unloaded", "shed_resource_exhausted")}
        shed = [f["shed_resource_exhausted"] for f in per if f["shed_resource_exhausted"] is not None]
        g, p = results[name]["goodput_over_capacity"], results[name]["p99_over_unloaded"]
        print(f"  {name:<16} goodput / bare capacity {g['value']:.2f} [{g['low']:.2f}, {g['high']:.2f}]   "
              f"p99 ratio {p['value']:.2f} [{p['low']:.2f}, {p['high']:.2f}]   "
              f"RESOURCE_EXHAUSTED share min {min(shed) if shed else float('nan'):.3f}")
    differences = {}
    for placement in placements:  # each limit against the placement's first, round by round
        base = f"{placement} limit {limits[0]}"
        for limit in limits[1:]:
            name = f"{placement} limit {limit}"
            differences[f"{name} - {base}"] = diff = {
                key: interval([row["fronts"][name][key] - row["fronts"][base][key] for row in rounds])
                for key in ("goodput_over_capacity", "p99_over_unloaded")}
            g, p = diff["goodput_over_capacity"], diff["p99_over_unloaded"]
            print(f"  {name} - {base}: goodput / bare capacity {g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"
                  f"   p99 ratio {p['value']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]")
    holding = {placement: holding_limits(results, placement, limits) for placement in placements}
    for placement, held in holding.items():  # the calibration an operator runs this bench for
        print(f"  {placement}: limits whose means hold both targets here: "
              f"{', '.join(map(str, held)) or 'none'}" + (f" (largest: {max(held)})" if held else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "unloaded_p99_ms": unloaded,
                                    "unloaded_p99_ms_pooled": baseline,
                                    "rounds": rounds, "summary": results, "holding_limits": holding,
                                    "differences": differences, "load_avg_after": os.getloadavg()},
                                   indent=2))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
