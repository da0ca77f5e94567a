"""Server interceptors of the ConceptLens service, outermost first (see docs/design.md, serving under overload):

- MetricsInterceptor: conceptlens_requests_total{method,model,code} and latency, recording the code the client
  receives: a client cancel is CANCELLED, a passed deadline DEADLINE_EXCEEDED (also when the handler finished
  after it), calls cut by a stopping server UNAVAILABLE, and refusals by the layers below with their own codes.
- TokenAuthInterceptor (optional): bearer tokens, checked before the request is parsed or admitted.
- AdmissionInterceptor: a per-method limit of calls in flight (refused at once with RESOURCE_EXHAUSTED and a retry
  hint, before the request is parsed), request parsing (an undecodable message is INVALID_ARGUMENT, not a
  traceback), and the reply-size check (a reply over the message limit is refused here, as the transport would,
  so that it is counted).

Health checks are never measured nor asked for a token (load balancers and Kubernetes probes call them). The Open
Inference Protocol counts its calls itself (server/oip.py).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from conceptlens.handlers.errors import InvalidInput, QueueFull

from .errors import Overloaded, Unauthenticated, to_status
from .metrics import Metrics
from .validation import short_model_name

SERVICE_PREFIX = "/conceptlens.v1.ConceptLens/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass
class _CallRecord:
    """What the inner layers learn about a call for the metrics layer (same task, so a ContextVar carries it)."""

    model: str = ""


_CALL: ContextVar[_CallRecord | None] = ContextVar("conceptlens_call", default=None)


def _wrap_unary(handler: grpc.RpcMethodHandler, fn, deserializer=None) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _expired(context: grpc.aio.ServicerContext, slack: float = 0.0) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack


DEADLINE_SLACK = 0.1  # share of a call's time budget within which a client cancel counts as its deadline


def _slack(context: grpc.aio.ServicerContext) -> float:
    """How close to the server's deadline a cancel is taken for the client's: the client's clock started when it
    sent the call, the server's when the headers arrived, so the client's deadline fires first by the transit and
    queueing delay, and the server only sees a cancel."""
    remaining = context.time_remaining()
    return 0.0 if remaining is None or remaining > 1e6 else DEADLINE_SLACK * remaining


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """conceptlens_requests_total{method,model,code} and conceptlens_request_duration_seconds{method,model}.

    `known_models()` bounds the model label: names the repository does not serve are counted as "unknown"; calls
    refused before their request was parsed carry model="". `stopping()` is true once the server drains: calls it
    cuts reach the client as UNAVAILABLE.
    """

    def __init__(self, metrics: Metrics, known_models: Callable[[], list[str]],
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.metrics = metrics
        self.known_models = known_models
        self.stopping = stopping

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method[len(SERVICE_PREFIX):]
        inner = handler.unary_unary

        async def measured(request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            record = _CallRecord()
            token = _CALL.set(record)
            slack = _slack(context)
            outcome: grpc.StatusCode | None = None
            try:
                return await inner(request, context)
            except asyncio.CancelledError:  # grpc.aio cancels the handler when the call ends under it
                outcome = (grpc.StatusCode.UNAVAILABLE if self.stopping() else grpc.StatusCode.DEADLINE_EXCEEDED
                           if _expired(context, slack) else grpc.StatusCode.CANCELLED)
                raise
            except BaseException:  # aborts set the context's code; anything else reaches the client as UNKNOWN
                outcome = grpc.StatusCode.UNKNOWN
                raise
            finally:
                _CALL.reset(token)
                code = outcome if outcome not in (None, grpc.StatusCode.UNKNOWN) else context.code()
                if code is None:  # no abort: UNKNOWN after an exception, else OK unless the deadline beat the reply
                    code = outcome or (grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.OK)
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                model = short_model_name(record.model)
                model = model if model in self.known_models() else ("" if not model else "unknown")
                self.metrics.requests.labels(method, model, name).inc()
                self.metrics.latency.labels(method, model).observe(time.perf_counter() - start)

        return _wrap_unary(handler, measured, handler.request_deserializer)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Per-method in-flight limits, request parsing and the reply-size check (see the module docstring).

    `limits` maps a ConceptLens method name (Predict, Explain, Probe) to the calls it may have in flight; methods
    not named are not limited here (they are cheap, and the server's `maximum_concurrent_rpcs` bounds all).
    """

    def __init__(self, metrics: Metrics, limits: dict[str, int], max_reply_bytes: int) -> None:
        self.metrics = metrics
        self.limits = dict(limits)
        self.max_reply_bytes = max_reply_bytes
        self.inflight = dict.fromkeys(self.limits, 0)
        self._seconds = dict.fromkeys(self.limits, 0.05)  # moving average of admitted calls' durations
        self._gauges = {m: metrics.inflight.labels(m) for m in self.limits}

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method[len(SERVICE_PREFIX):]
        inner, parse = handler.unary_unary, handler.request_deserializer
        limit = self.limits.get(method)

        async def admitted(raw: bytes, context: grpc.aio.ServicerContext):
            if limit is not None and self.inflight[method] >= limit:
                self.metrics.rejected.labels("", method.lower(), "inflight").inc()
                wait = self._seconds[method]
                await context.abort_with_status(to_status(Overloaded(
                    f"{method}: {limit} calls already in flight, the server's limit for this method; retry in "
                    f"~{wait * 1000:.0f} ms", retry_after_s=wait)))
            try:
                request = parse(raw) if parse is not None else raw
            except Exception:  # DecodeError and friends: the message is the client's fault
                await context.abort_with_status(to_status(InvalidInput(
                    "request", f"{len(raw)} bytes that do not parse as a {method} request message")))
            record = _CALL.get()
            if record is not None:
                record.model = getattr(request, "model", "") or getattr(request, "name", "")
            if limit is None:
                return await self._checked(await inner(request, context), method, context)
            self.inflight[method] += 1
            self._gauges[method].inc()
            start = time.perf_counter()
            try:
                return await self._checked(await inner(request, context), method, context)
            finally:
                self.inflight[method] -= 1
                self._gauges[method].dec()
                self._seconds[method] += 0.1 * (time.perf_counter() - start - self._seconds[method])

        return _wrap_unary(handler, admitted)

    async def _checked(self, response, method: str, context: grpc.aio.ServicerContext):
        size = response.ByteSize() if hasattr(response, "ByteSize") else 0
        if size > self.max_reply_bytes:
            await context.abort_with_status(to_status(QueueFull(
                f"the {method} reply is {size} bytes, over the server's message limit of {self.max_reply_bytes}; "
                "ask for less (fewer images, units or maps)")))
        return response


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every call except health checks (UNAUTHENTICATED otherwise)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:  # streaming (reflection): refuse outright
            return _reject_stream()
        problem = "missing bearer token" if not given else "invalid bearer token"

        async def reject(_request, context: grpc.aio.ServicerContext):
            await context.abort_with_status(to_status(Unauthenticated(f"authorization: {problem}")))

        return _wrap_unary(handler, reject)  # no deserializer: an unauthenticated message is never parsed


def _reject_stream() -> grpc.RpcMethodHandler:
    async def reject(_request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: bearer token required")
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(reject)
