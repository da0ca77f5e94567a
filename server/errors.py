"""The one table from domain errors to gRPC status codes (kserve's habit: errors raised inside know nothing of
the transport; this edge maps them). Anything not in the table is a bug: INTERNAL with a generic message, and
the traceback goes to the log, never to the client.

Every mapped error carries a `google.rpc.BadRequest` (field + problem) or `ErrorInfo` detail via grpc_status.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conceptlens.handlers.errors import BundleError, InvalidInput, ModelLoading, QueueFull, UnknownName

log = logging.getLogger(__name__)


class DeadlineExpired(Exception):
    """The call's deadline passed before its work could start or finish (raised by the batcher)."""


class Unauthenticated(Exception):
    """A bearer token is required and was missing or wrong."""


# Order matters only where classes overlap; the first match wins.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownName, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE),
    (BundleError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
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
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(proto)


async def abort(context: grpc.aio.ServicerContext, err: BaseException, method: str = "") -> None:
    """End the call with `err`'s status (raises, as `context.abort` does)."""
    await context.abort_with_status(to_status(err, method))
