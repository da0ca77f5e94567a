"""The server's configuration: one frozen dataclass, built only by the CLI (`server/cli.py`) and passed in.

Nothing here reads argv or the environment; tests build a `ServerConfig` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching of one method (Triton's per-model knobs): a batch closes when it holds `max_batch`
    images or when its first request has waited `max_delay_s`; at most `queue_size` requests wait. At most
    `max_inflight` calls of the method are admitted at once (decoding, queued or running); more are refused with
    RESOURCE_EXHAUSTED and a retry hint before their request is even parsed (server/interceptors.py). A call that
    would wait more than `max_queue_batches` batch times before it starts is refused too (server/batching.py)."""

    max_batch: int = 32
    max_delay_s: float = 0.005
    queue_size: int = 256
    workers: int = 1  # batches of this method run concurrently on this many executor threads
    max_inflight: int = 64
    # A request is refused when it would wait more than this many batch times (the recent average) before it
    # starts: admitted calls then finish within a few batch times however long their deadline (0 = no bound)
    max_queue_batches: float = 1.0


@dataclass(frozen=True)
class Limits:
    """Server-side caps that hold whatever the request asks."""

    max_images: int = 64  # per Predict/Explain request
    max_probe_images: int = 8  # per Probe request
    max_pixels: int = 4096 * 4096  # decoded image area; headers claiming more are refused before decoding
    max_request_pixels: int = 4 * 4096 * 4096  # decoded pixels of one request's images together (from headers)
    max_message_bytes: int = 32 * 1024 * 1024  # gRPC receive limit; larger messages get RESOURCE_EXHAUSTED
    max_candidates: int = 128  # hidden-layer exact re-runs per layer
    max_links: int = 256  # multi-layer traces: units given contributors per image (top_k_units^1 + ... ^(depth-1))
    max_probe_steps: int = 200  # iterations of an iterative attack (RESOURCE_EXHAUSTED above)
    max_probe_restarts: int = 5  # PGD random restarts
    max_probe_queries: int = 5000  # Square: model queries per image
    max_probe_epsilon: float = 0.5  # L-inf budget / top of a search range, [0,1] pixel units (INVALID_ARGUMENT above)
    max_probe_epsilon_l2: float = 64.0  # the same for L2 budgets
    max_probe_work: int = 20_000  # image passes per probe: images x steps x restarts x members x search rounds
    max_probe_members: int = 4  # other served models in a ghost-ensemble probe


@dataclass(frozen=True)
class ServerConfig:
    """Everything `serve` needs. Paths are resolved by the CLI."""

    models: Path
    host: str = "127.0.0.1"  # loopback unless asked: containers and Kubernetes pass --host 0.0.0.0 explicitly
    metrics_host: str | None = None  # None: the same address as `host`
    port: int = 50051
    metrics_port: int | None = None  # None: no HTTP exposition
    reuse_port: bool = False  # share `port` with other servers that set it too (SO_REUSEPORT); off: a clash fails
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mTLS, clients must present a certificate signed by this CA
    token: str | None = None  # set: every call except health needs `authorization: Bearer <token>`
    threads: int = 0  # ONNX Runtime intra-op threads per session; 0 = runtime default
    poll_interval_s: float = 5.0  # hot reload: how often the repository is rescanned; 0 disables
    grace_s: float = 10.0  # SIGTERM: time in-flight calls get to finish
    plausibility_threshold: float = 0.5  # below it an explanation is flagged adversarial
    verify_onnx: bool = True  # check ONNX vs torch outputs when loading a bundle
    probe_processes: int = 1  # probe worker processes (their own GIL, niced); 0 = probes on a server thread
    # (probe.workers batches of one model run at once; the CLI sets it to probe_processes)
    probe_threads: int = 1  # torch and ONNX Runtime intra-op threads of each probe worker
    probe_pinning: bool = True  # pin each probe worker to its own CPUs, from the last one down
    predict: BatchConfig = field(default_factory=BatchConfig)
    explain: BatchConfig = field(default_factory=lambda: BatchConfig(max_batch=16, queue_size=128, max_inflight=8))
    probe: BatchConfig = field(default_factory=lambda: BatchConfig(max_batch=4, queue_size=16, max_inflight=8))
    limits: Limits = field(default_factory=Limits)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def metrics_bind(self) -> str:
        """The address the metrics HTTP server binds: `metrics_host`, else `host`, without gRPC's IPv6 brackets."""
        host = self.metrics_host if self.metrics_host is not None else self.host
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host
