"""Errors cross the probe worker pipe as themselves (pickled), so server/errors.py is the only error table: a
domain error keeps its type and fields, an unpicklable one becomes an INTERNAL RuntimeError, and the worker's
traceback rides along as a note."""

from __future__ import annotations

import pickle

import grpc
import pytest

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.server.errors import DeadlineExpired, status_for
from conceptlens.server.probe_exec import error_answer, result


def _cross(err: Exception) -> Exception:
    """Raise `err` in a 'worker', send its answer through pickle as the pipe does, and return what the parent
    raises."""
    try:
        raise err
    except Exception as caught:
        answer = pickle.loads(pickle.dumps(error_answer(caught)))
    with pytest.raises(Exception) as raised:
        result(answer)
    return raised.value


@pytest.mark.parametrize(("err", "code"), [
    (InvalidInput("attack.epsilon", "too big"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownName("model", "nope", ["a", "b"]), grpc.StatusCode.NOT_FOUND),
    (DeadlineExpired("deadline passed 0.1s ago"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError("bad value"), grpc.StatusCode.INTERNAL),
])
def test_domain_errors_keep_type_fields_and_status(err: Exception, code: grpc.StatusCode) -> None:
    back = _cross(err)
    assert type(back) is type(err) and str(back) == str(err) and status_for(back) == code
    assert vars(back).get("field") == vars(err).get("field")
    assert any("probe worker traceback" in note for note in back.__notes__)


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling re-calls __init__ with args=(message,): fails
        super().__init__(f"{a}/{b}")


def test_an_unpicklable_error_arrives_as_internal() -> None:
    back = _cross(_Unpicklable(1, 2))
    assert isinstance(back, RuntimeError) and "_Unpicklable: 1/2" in str(back)
    assert status_for(back) == grpc.StatusCode.INTERNAL
