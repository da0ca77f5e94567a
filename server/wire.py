"""Malformed request messages on the services beside conceptlens.v1 (Open Inference Protocol, health, reflection):
INVALID_ARGUMENT naming the request, never gRPC's UNKNOWN with a Python exception class and a logged traceback
per message.

grpc.aio parses a request with the method's deserializer before the handler runs, and a message that does not
parse raises inside gRPC itself. This interceptor, the innermost, swaps in a deserializer that returns a marker
instead, and the handler refuses the marker. conceptlens.v1 methods are parsed (and refused the same way) by the
AdmissionInterceptor, after admission, so this one leaves them alone. Refusals are logged at most once per
LOG_EVERY_S with a count, so a flood of garbage cannot flood the log.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from conceptlens.handlers.errors import InvalidInput

from .errors import to_status

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


class Malformed:
    """Stands for a request message that did not parse."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _RateLimitedLog:
    """One warning per `every_s` seconds, saying how many malformed messages came since the last one."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._count = 0
        self._lock = threading.Lock()

    def note(self, method: str, size: int) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("refused %d malformed request message(s) in the last %.0f s (latest: %d bytes to %s)",
                    count, self.every_s, size, method)


class RequestParsingInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT for request messages that do not parse, on every method outside `skip_prefix`."""

    def __init__(self, skip_prefix: str = "/conceptlens.v1.ConceptLens/", log_every_s: float = LOG_EVERY_S) -> None:
        self.skip_prefix = skip_prefix
        self._log = _RateLimitedLog(log_every_s)

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or details.method.startswith(self.skip_prefix):
            return handler
        method = details.method
        parse = _lenient(handler.request_deserializer)
        serialize = handler.response_serializer

        async def refuse(message: Malformed, context: grpc.aio.ServicerContext) -> None:
            self._log.note(method, message.size)
            await context.abort_with_status(to_status(InvalidInput(
                "request", f"{message.size} bytes that do not parse as a {method.rsplit('/', 1)[-1]} request "
                "message (truncated or corrupt protobuf)")))

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, parse, serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _checked_unary_stream(handler.unary_stream, refuse), parse, serialize)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _checked_stream_stream(handler.stream_stream, refuse), parse, serialize)
        return handler  # stream-unary: none served


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # DecodeError and friends: the client's bytes, not a server fault
            return Malformed(len(raw))

    return deserialize


def _checked_unary_stream(inner: Callable, refuse: Callable) -> Callable:
    """A server-streaming behaviour (coroutine or async generator, as grpc.aio allows) that refuses a marker."""
    if inspect.isasyncgenfunction(inner):
        async def generate(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for item in inner(request, context):
                yield item

        return generate

    async def respond(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await refuse(request, context)
        return await inner(request, context)

    return respond


def _checked_stream_stream(inner: Callable, refuse: Callable) -> Callable:
    """A bidirectional behaviour (async generator or coroutine) whose request stream refuses a marker."""
    if inspect.isasyncgenfunction(inner):
        async def generate(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
            async for item in inner(_checked_requests(requests, context, refuse), context):
                yield item

        return generate

    async def respond(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await inner(_checked_requests(requests, context, refuse), context)

    return respond


async def _checked_requests(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                            refuse: Callable) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await refuse(request, context)
        yield request
