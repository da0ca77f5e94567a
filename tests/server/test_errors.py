"""The one error table: domain errors to gRPC codes, unknown errors hidden as INTERNAL."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from conceptlens.handlers.errors import BundleError, InvalidInput, ModelLoading, QueueFull, UnknownName
from conceptlens.server.errors import DeadlineExpired, Unauthenticated, status_for, to_status


@pytest.mark.parametrize(("err", "code"), [
    (InvalidInput("images", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownName("model", "x", ["a"]), grpc.StatusCode.NOT_FOUND),
    (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoading("loading"), grpc.StatusCode.UNAVAILABLE),
    (BundleError("bad"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (NotImplementedError("later"), grpc.StatusCode.UNIMPLEMENTED),
    (KeyError("oops"), grpc.StatusCode.INTERNAL),
])
def test_table(err, code):
    assert status_for(err) is code


def test_invalid_input_carries_bad_request_detail():
    status = to_status(InvalidInput("images[0].tensor.shape", "must be [3, 8, 8]"))
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "images[0].tensor.shape: must be [3, 8, 8]"
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    detail = error_details_pb2.BadRequest()
    assert proto.details[0].Unpack(detail)
    assert (detail.field_violations[0].field, detail.field_violations[0].description) == (
        "images[0].tensor.shape", "must be [3, 8, 8]")


def test_unknown_errors_are_hidden_and_logged(caplog):
    try:
        raise ZeroDivisionError("secret internals")
    except ZeroDivisionError as err:
        with caplog.at_level(logging.ERROR):
            status = to_status(err, "Predict")
    assert status.code is grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "server log" in status.details
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
