"""`conceptlens serve`: start the gRPC predict-and-explain service on a model repository."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

from .config import BatchConfig, ServerConfig
from .ports import check_free


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, type=Path,
                        help="model repository: <name>/<numeric version>/ bundle directories (watched for changes)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 or [::] for all "
                        "interfaces, as containers need)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default 50051)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--metrics-host", default=None,
                        help="address the metrics port binds (default: the same as --host)")
    parser.add_argument("--tls-cert", type=Path, help="PEM server certificate (enables TLS; needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates signed by it (mTLS)")
    parser.add_argument("--token-file", type=Path,
                        help="file holding a bearer token every call (except health) must present")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per model (0 = runtime default)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between repository rescans (0 = never)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get after SIGTERM")
    parser.add_argument("--max-batch", type=int, default=32, help="Predict: images per dynamic batch")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="Predict: longest wait to fill a batch")
    parser.add_argument("--no-verify-onnx", action="store_true", help="skip the ONNX-vs-torch check at load")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share --port with other servers started with --reuse-port (SO_REUSEPORT: the kernel "
                        "splits connections between them); default: a used port is an error")
    parser.add_argument("--max-inflight", action="append", default=[], metavar="METHOD=N",
                        help="calls of a method (predict, explain, probe) admitted at once; more are refused with "
                        "RESOURCE_EXHAUSTED and a retry hint (defaults: predict=64, explain=8, probe=8; repeatable)")
    parser.add_argument("--max-queue-batches", type=float, default=1.0, metavar="B",
                        help="refuse (RESOURCE_EXHAUSTED, retry hint) a call that would wait more than B batch times "
                        "before it starts, whatever its deadline: under overload the admitted calls stay fast "
                        "(default 1; 0 = only the deadline decides)")
    parser.add_argument("--probe-workers", type=int, default=1,
                        help="Probe: worker processes running attacks beside the server (default 1; 0 = on a "
                        "server thread, sharing Predict's GIL)")
    parser.add_argument("--probe-threads", type=int, default=1,
                        help="Probe: torch and ONNX Runtime threads per worker (default 1)")
    parser.add_argument("--no-probe-pinning", action="store_true",
                        help="Probe: let workers run on any CPU (default: each pinned to its own, from the last one)")


def build_config(args: argparse.Namespace) -> ServerConfig:
    """Validate the arguments (before any work) and build the frozen config."""
    for name in ("port", "metrics_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            raise InvalidInput(f"--{name.replace('_', '-')}", f"must be a port number 0..65535, got {value}")
    if not args.models.is_dir():
        raise InvalidInput("--models", f"{args.models} is not a directory (create it or export a bundle into it)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidInput("--tls-cert/--tls-key", "give both or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise InvalidInput("--tls-client-ca", "needs --tls-cert and --tls-key (mTLS is TLS with client certificates)")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise InvalidInput(f"--{name.replace('_', '-')}", f"no such file: {path}")
    token = args.token_file.read_text().strip() if args.token_file else None
    if args.token_file and not token:
        raise InvalidInput("--token-file", f"{args.token_file} is empty")
    if args.threads < 0 or args.poll < 0 or args.grace < 0 or args.max_batch < 1 or args.max_delay_ms < 0:
        raise InvalidInput("arguments", "--threads, --poll, --grace, --max-delay-ms must be >= 0, --max-batch >= 1")
    if not args.max_queue_batches >= 0:  # also refuses nan
        raise InvalidInput("--max-queue-batches", f"must be >= 0, got {args.max_queue_batches}")
    if args.probe_workers < 0 or args.probe_threads < 1:
        raise InvalidInput("arguments", "--probe-workers must be >= 0, --probe-threads >= 1")
    config = ServerConfig(
        models=args.models.resolve(), host=args.host, port=args.port, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        reuse_port=args.reuse_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, token=token,
        threads=args.threads, poll_interval_s=args.poll, grace_s=args.grace, verify_onnx=not args.no_verify_onnx,
        probe_processes=args.probe_workers, probe_threads=args.probe_threads,
        probe_pinning=not args.no_probe_pinning,
    )
    config = replace(config, predict=BatchConfig(max_batch=args.max_batch, max_delay_s=args.max_delay_ms / 1000),
                     probe=replace(config.probe, workers=max(1, args.probe_workers)))  # a batch per worker at once
    for method, limit in _inflight_limits(args.max_inflight).items():
        config = replace(config, **{method: replace(getattr(config, method), max_inflight=limit)})
    for method in ("predict", "explain", "probe"):
        config = replace(config, **{method: replace(getattr(config, method), max_queue_batches=args.max_queue_batches)})
    return config


def _inflight_limits(values: list[str]) -> dict[str, int]:
    """--max-inflight METHOD=N values as {method: N}."""
    limits = {}
    for value in values:
        method, _, number = value.partition("=")
        if method not in ("predict", "explain", "probe") or not number.isascii() or not number.isdigit() \
                or int(number) < 1:
            raise InvalidInput("--max-inflight", f"expected METHOD=N with METHOD predict, explain or probe and N >= 1, "
                               f"got {value!r}")
        limits[method] = int(number)
    return limits


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    # A used port is one line and exit 2 before any model loads (the server's own bind would log gRPC errors).
    if not config.reuse_port:
        check_free(config.host, config.port, "--port")
    if config.metrics_port is not None:
        check_free(config.metrics_bind, config.metrics_port, "--metrics-port")
    from .app import serve

    code = asyncio.run(serve(config))
    # Everything has stopped (calls, batchers, probe workers, metrics): end the process here rather than through
    # interpreter finalization, whose destructors (gRPC core, ONNX Runtime, torch) took 5-15 s after a cancelled
    # trace and would break the --grace bound (server/app.py).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
