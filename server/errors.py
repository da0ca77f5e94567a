"""The one table from domain errors to gRPC status codes (kserve's habit: errors raised inside know nothing of
the transport; this edge maps them). Anything not in the table is a bug: INTERNAL with a generic message, and
the traceback goes to the log, never to the client.

Every mapped error carries a `google.rpc.BadRequest` (field + problem) or `ErrorInfo` detail via grpc_status.
Overload refusals (Overloaded) also carry a `google.rpc.RetryInfo` and the `grpc-retry-pushback-ms` trailer that
gRPC's own retry policy obeys (gRFC A6); other RESOURCE_EXHAUSTED refusals (work caps, reply size) carry a
pushback of -1, which tells a retrying client not to retry what would fail again; so do errors whose class sets
`retry_safe = False` (a probe whose worker process died may have killed it, and an automatic retry would kill the
next worker too).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conceptlens.handlers.errors import BundleError, InvalidInput, ModelLoading, QueueFull, UnknownName

log = logging.getLogger(__name__)


class DeadlineExpired(Exception):
    """The call's deadline passed before its work could start or finish (raised by the batcher)."""


class Unauthenticated(Exception):
    """A bearer token is required and was missing or wrong."""


class Overloaded(QueueFull):
    """Admission refused a call for now (too many in flight, or it could not start before its deadline); the
    client may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """The call ended (client cancel, server stopping) while its work ran; raised by long loops that checked."""


PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6: the server's retry hint, read by gRPC's client retry policy


# Order matters only where classes overlap; the first match wins.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownName, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE),
    (BundleError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),  # a method declared in the proto, not built yet
)


def status_for(err: BaseException) -> grpc.StatusCode:
    """The gRPC code of a domain error; INTERNAL for anything unknown."""
    return next((code for kind, code in STATUS if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


def to_status(err: BaseException, method: str = "") -> grpc.Status:
    """The rich status sent for `err`. Unknown errors are logged with their traceback and hidden."""
    code = status_for(err)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", method or "call", exc_info=err)
        message = "internal error; see the server log"
    else:
        message = str(err)
    detail = any_pb2.Any()
    if isinstance(err, InvalidInput):
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.problem)]
        ))
    else:
        detail.Pack(error_details_pb2.ErrorInfo(reason=type(err).__name__ if code is not grpc.StatusCode.INTERNAL
                                                else "INTERNAL", domain="conceptlens.v1"))
    details = [detail]
    pushback = None
    if isinstance(err, Overloaded):
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(err.retry_after_s * 1e9))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
        pushback = str(max(1, round(err.retry_after_s * 1000)))
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED or not getattr(err, "retry_safe", True):
        pushback = "-1"  # a work cap, or a request that may itself have caused the failure: do not retry it
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    status = rpc_status.to_status(proto)
    if pushback is None:
        return status
    return _Status(status.code, status.details, (*status.trailing_metadata, (PUSHBACK_KEY, pushback)))


class _Status(grpc.Status):
    """grpc.Status is an interface; grpc_status builds its own private one, so trailers are added with this."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


async def abort(context: grpc.aio.ServicerContext, err: BaseException, method: str = "") -> None:
    """End the call with `err`'s status (raises, as `context.abort` does)."""
    await context.abort_with_status(to_status(err, method))
