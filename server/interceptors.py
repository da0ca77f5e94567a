"""Server interceptors: request count and latency per method (with a `try/finally`, so failures are counted),
and optional bearer-token authentication. Only the ConceptLens service is measured; health checks are never
asked for a token (load balancers and Kubernetes probes call them)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

import grpc

from .errors import Unauthenticated, to_status
from .metrics import Metrics

SERVICE_PREFIX = "/conceptlens.v1.ConceptLens/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _wrap_unary(handler: grpc.RpcMethodHandler, fn) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """conceptlens_requests_total{method,model,code} and conceptlens_request_duration_seconds{method,model}.

    `known_models()` bounds the model label: names the repository does not serve are counted as "unknown".
    """

    def __init__(self, metrics: Metrics, known_models: Callable[[], list[str]]) -> None:
        self.metrics = metrics
        self.known_models = known_models

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method[len(SERVICE_PREFIX):]
        inner = handler.unary_unary

        async def measured(request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            model = getattr(request, "model", "")
            model = model if model in self.known_models() else ("" if not model else "unknown")
            failed = None
            try:
                return await inner(request, context)
            except BaseException as err:
                failed = err
                raise
            finally:
                code = context.code()
                if code is None:
                    code = grpc.StatusCode.OK if failed is None else grpc.StatusCode.UNKNOWN
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                self.metrics.requests.labels(method, model, name).inc()
                self.metrics.latency.labels(method, model).observe(time.perf_counter() - start)

        return _wrap_unary(handler, measured)


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

        return _wrap_unary(handler, reject)


def _reject_stream() -> grpc.RpcMethodHandler:
    async def reject(_request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: bearer token required")
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(reject)
