"""Assemble and run the server: grpc.aio with the ConceptLens servicer, standard health (overall, the service,
and one entry per model: `models/<name>`), server reflection, TLS / mTLS, interceptors, Prometheus exposition,
repository polling, and a graceful stop: SIGTERM flips health to NOT_SERVING, refuses new calls, lets in-flight
calls finish within `grace_s`, then cancels the rest (their traces stop at the next check, probe workers are
terminated) and returns; `conceptlens serve` then ends the process at once (server/cli.py), without waiting for
executor threads still busy. A watchdog exits the process (status 1) if stopping itself takes more than
`grace_s` + SHUTDOWN_SLACK_S: Kubernetes would otherwise SIGKILL it.

Admission (docs/design.md, serving under overload): each expensive method has its own limit of calls in flight
(BatchConfig.max_inflight, enforced by AdmissionInterceptor with a retry hint); the grpc.aio server's
`maximum_concurrent_rpcs` is a backstop above their sum, so that cheap calls (health, ListModels) still get in and
the event loop never holds an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conceptlens.handlers.errors import InvalidInput
from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

from . import grpc_logs
from .config import ServerConfig
from .interceptors import AdmissionInterceptor, MetricsInterceptor, TokenAuthInterceptor
from .metrics import Metrics
from .oip import SERVICE_NAME as OIP_SERVICE_NAME
from .oip import OipServicer
from .ports import check_free, in_use
from .probe_worker import ProbeWorkers
from .repository import ModelRepository
from .runners import Runners
from .servicer import ConceptLensServicer
from .wire import RequestParsingInterceptor

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConceptLens"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHEAP_CALLS = 64  # in-flight room for unlimited methods (health, ListModels, GetModel, reflection) in the backstop
SHUTDOWN_SLACK_S = 1.5  # after SIGTERM the process is gone within grace + this (the watchdog's margin)


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name of one model."""
    return f"models/{model}"


class ConceptLensServer:
    """One server. `await start()` binds (port 0 picks a free port: read `.port`), `await stop()` drains."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.repository = ModelRepository(config.models, self.metrics, threads=config.threads,
                                          verify_onnx=config.verify_onnx)
        self.health = health.aio.HealthServicer()
        self.probe_workers = ProbeWorkers(config.probe_processes, config.probe_threads, config.plausibility_threshold,
                                          pin=config.probe_pinning)
        runners = Runners(self.metrics, config.plausibility_threshold, self.probe_workers)
        self.servicer = ConceptLensServicer(config, self.repository, runners, self.metrics)
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http = None
        self._poller: asyncio.Task | None = None
        self._health_names: set[str] = set()
        self._stopping = False

    async def start(self) -> int:
        cfg = self.config
        grpc_logs.install()  # a reply raced by its client's deadline is not an ERROR traceback per call
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MetricsInterceptor(self.metrics, self.repository.names, lambda: self._stopping)]
        if cfg.token:
            interceptors.append(TokenAuthInterceptor(cfg.token))
        limit = cfg.limits.max_message_bytes
        inflight = {"Predict": cfg.predict.max_inflight, "Explain": cfg.explain.max_inflight,
                    "Probe": cfg.probe.max_inflight}
        interceptors.append(AdmissionInterceptor(self.metrics, inflight, limit))
        interceptors.append(RequestParsingInterceptor())  # malformed OIP/health/reflection messages: INVALID_ARGUMENT
        server = grpc.aio.server(
            interceptors=interceptors, maximum_concurrent_rpcs=sum(inflight.values()) + CHEAP_CALLS,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", int(cfg.reuse_port))])  # gRPC's default 1 would share a used port
        pb_grpc.add_ConceptLensServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Open Inference Protocol (KServe v2) beside conceptlens.v1, on the same repository and Predict batcher.
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(self.repository, self.servicer, self.metrics),
                                                            server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, OIP_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        # Both ports are bound before any model loads, so a clash fails fast with one line (server/ports.py).
        address = f"{cfg.host}:{cfg.port}"
        try:
            self.port = (server.add_secure_port(address, _credentials(cfg)) if cfg.tls
                         else server.add_insecure_port(address))
        except RuntimeError:  # gRPC's "Failed to bind": say why when the port is taken
            check_free(cfg.host, cfg.port, "--port")
            raise InvalidInput("--port", f"cannot listen on {address}") from None
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        if cfg.metrics_port is not None:
            try:
                self._http = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_bind)  # follows --host
            except OSError as err:
                await server.stop(None)
                if err.errno == errno.EADDRINUSE:
                    raise in_use(cfg.metrics_port, "--metrics-port", cfg.metrics_bind) from None
                raise
            self.metrics_port = self._http.server_port
        await self.repository.refresh()
        # Probe workers import torch and load the served models in the background; start() does not wait.
        await asyncio.to_thread(self.probe_workers.start, [self.repository.resolve(n) for n in self.repository.names()])
        await server.start()
        self._server = server
        await self._sync_health()
        if cfg.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll(cfg.poll_interval_s), name="repository-poll")
        log.info("serving %s on %s (port %d, %s), models: %s; metrics port %s", SERVICE_NAME, cfg.host, self.port,
                 "TLS" + (" + client certificates" if cfg.tls_client_ca else "") if cfg.tls else "plaintext",
                 ", ".join(self.repository.names()) or "none yet", self.metrics_port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within `grace` seconds, release everything."""
        grace = self.config.grace_s if grace is None else grace
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.servicer.close()
        await asyncio.to_thread(self.probe_workers.close)  # no worker process outlives the server
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        log.info("stopped")

    async def refresh(self) -> bool:
        """Rescan the repository now (the poller does this every `poll_interval_s`)."""
        changed = await self.repository.refresh()
        if changed:
            await self._sync_health()
        return changed

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("repository refresh failed; keeping the models already loaded")

    async def _sync_health(self) -> None:
        names = {model_health_name(n) for n in self.repository.names()}
        for gone in self._health_names - names:
            await self.health.set(gone, NOT_SERVING)
        for name in names:
            await self.health.set(name, SERVING)
        self._health_names = names
        overall = SERVING if names else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(SERVICE_NAME, overall)


def _credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    key = cfg.tls_key.read_bytes()
    cert = cfg.tls_cert.read_bytes()
    ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then stop gracefully. Returns the exit code (0)."""
    server = ConceptLensServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"conceptlens serve: listening on port {server.port}", flush=True)  # result line for scripts and tests
    await stop.wait()
    log.info("signal received: draining (grace %.1fs)", config.grace_s)
    _exit_after(config.grace_s + SHUTDOWN_SLACK_S)
    await server.stop()
    return 0


def _exit_after(seconds: float) -> None:
    """Start a daemon thread that ends the process after `seconds` if it has not exited by then: a step of
    stop() that hangs (a probe worker that ignores SIGTERM, a servicer close stuck behind a thread) must not keep
    the process past its grace."""

    def watchdog() -> None:
        threading.Event().wait(seconds)
        log.error("still stopping %.1fs after the signal; exiting now with work in flight", seconds)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
