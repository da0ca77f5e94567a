"""`conceptlens front`: run nginx in front of `conceptlens serve`, refusing calls over per-method in-flight limits
before they reach Python (server/front.py; docs/design.md §9.2)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from conceptlens.handlers.errors import InvalidInput

from .front import DEFAULT_LIMITS, FrontConfig, command, nginx_binary, parse_limits, render, split_address
from .front_metrics import FrontCollector, RefusalLog
from .ports import check_free


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run nginx as a shedding front for `conceptlens serve`: a call over its method's in-flight limit is refused "
        "in nginx with RESOURCE_EXHAUSTED, a message naming the limit and gRPC's retry pushback, without costing "
        "the Python server anything; other calls pass through unchanged. Use it when bursts of cheap calls (e.g. "
        "1-image Predicts) would otherwise take the server's event loop just to refuse them (bench/README.md). "
        "Needs an nginx binary (Debian: nginx-light). Refusals are logged one per line to DIR/refusals.log "
        "(rotated past 8 MB) and counted in conceptlens_front_refusals_total{method} on --metrics-port."
    )
    parser.add_argument("--backend", required=True, help="HOST:PORT of `conceptlens serve`, e.g. 127.0.0.1:50052")
    parser.add_argument("--listen", default="127.0.0.1:50051",
                        help="HOST:PORT clients dial (default 127.0.0.1:50051; 0.0.0.0:50051 in containers)")
    parser.add_argument("--limit", action="append", default=[], metavar="METHOD=N",
                        help="calls in flight per method, repeatable (default "
                             + ", ".join(f"{m}={n}" for m, n in DEFAULT_LIMITS.items()) + ")")
    parser.add_argument("--retry-ms", type=int, default=20, help="retry pushback sent with a refusal (default 20)")
    parser.add_argument("--dir", type=Path, default=Path(".conceptlens-front"),
                        help="nginx's working directory: config, pid, logs (default .conceptlens-front)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the front's Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--metrics-host", default=None,
                        help="address the metrics port binds (default: the host of --listen)")
    parser.add_argument("--print-config", action="store_true", help="print the nginx config and exit")


def run(args: argparse.Namespace) -> int:
    if args.retry_ms < 0:
        raise InvalidInput("--retry-ms", f"must be >= 0, got {args.retry_ms}")
    cfg = FrontConfig(listen=args.listen, backend=args.backend, directory=args.dir, limits=parse_limits(args.limit),
                      retry_ms=args.retry_ms)
    text = render(cfg)  # validates --listen and --backend
    if args.print_config:
        print(text, end="")
        return 0
    listen_host, listen_port = split_address(cfg.listen, "--listen")
    check_free(listen_host, listen_port, "--listen")  # one line, not nginx's six retries
    metrics_host = args.metrics_host or listen_host
    if args.metrics_port is not None:
        check_free(metrics_host, args.metrics_port, "--metrics-port")
    binary = nginx_binary()
    if binary is None:
        raise InvalidInput("nginx", "no nginx binary on PATH (Debian: apt-get install nginx-light)")
    nginx = subprocess.Popen(command(cfg, binary))
    # SIGUSR1: nginx reopens its logs, so refusals.log can be rotated under it
    refusals = RefusalLog(cfg.directory, reopen=lambda: nginx.send_signal(signal.SIGUSR1))
    threading.Thread(target=_keep_reading, args=(refusals,), name="refusal-log", daemon=True).start()
    if args.metrics_port is not None:
        registry = CollectorRegistry()
        registry.register(FrontCollector(refusals, cfg.limits))
        start_http_server(args.metrics_port, addr=metrics_host.strip("[]"), registry=registry)
    # SIGTERM (Kubernetes, docker stop) drains: nginx's SIGQUIT lets the calls in flight finish, its SIGTERM would
    # cut them while the server behind is still honouring its --grace
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: nginx.send_signal(signal.SIGQUIT))
    metrics = f", metrics on {metrics_host}:{args.metrics_port}" if args.metrics_port is not None else ""
    print(f"conceptlens front: {cfg.listen} -> {cfg.backend}, limits "
          + ", ".join(f"{m}={n}" for m, n in cfg.limits.items()) + metrics, flush=True)
    return nginx.wait()


def _keep_reading(refusals: RefusalLog, every_s: float = 5.0) -> None:
    """Read the refusal log between scrapes too (or without any), so it is rotated before it grows large."""
    while True:
        time.sleep(every_s)
        refusals.counts()
