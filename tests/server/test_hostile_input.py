"""Hostile input on a real server over loopback: Unicode digits in Open Inference Protocol versions, truncated
protobuf messages (INVALID_ARGUMENT without a traceback per message), and bearer-token refusal before any parsing.
No call made here may end INTERNAL or UNKNOWN."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from serving_helpers import SIZE, config

from conceptlens.server.background import BackgroundServer
from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2 as oip
from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

NOT_DIGITS = ("²", "٣", "１", "1²", "-1", "0", "1e3", " 1", "99999999999999999999999")


def _infer(version: str) -> oip.ModelInferRequest:
    x = np.zeros((1, 3, SIZE, SIZE), dtype="<f4")
    tensor = oip.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=list(x.shape))
    return oip.ModelInferRequest(model_name="small", model_version=version, inputs=[tensor],
                                 raw_input_contents=[x.tobytes()])


@pytest.mark.parametrize("version", NOT_DIGITS)
def test_oip_versions_that_are_not_plain_numbers_are_invalid(served, version):
    server, _client = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        calls = (lambda: stub.ModelReady(oip.ModelReadyRequest(name="small", version=version), timeout=30),
                 lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="small", version=version), timeout=30),
                 lambda: stub.ModelInfer(_infer(version), timeout=30))
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "version" in info.value.details()


def test_oip_unknown_version_is_not_found(served):
    server, _client = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(oip.ModelReadyRequest(name="small", version="7"), timeout=30).ready is False
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_infer("7"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.ModelInfer(_infer("1"), timeout=30).model_version == "1"


# --- malformed messages and authentication -----------------------------------------------------------------

PREDICT = "/conceptlens.v1.ConceptLens/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _truncated(method: str) -> bytes:
    """A valid request of `method` cut inside its last field: protobuf refuses it ("Truncated message")."""
    if method == PREDICT:
        whole = pb.PredictRequest(model="small", images=[pb.Image(encoded=b"\x89PNG" + bytes(200))])
    elif method == MODEL_INFER:
        whole = _infer("1")
    else:
        from grpc_health.v1 import health_pb2
        whole = health_pb2.HealthCheckRequest(service="conceptlens.v1.ConceptLens")
    data = whole.SerializeToString()
    return data[: len(data) - 3]


def _call_raw(target: str, method: str, data: bytes, token: str | None = None) -> grpc.RpcError:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(data, timeout=30, metadata=metadata)
    return info.value


def _server_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING
            and (r.name.startswith("conceptlens") or r.name.startswith("grpc"))]


@pytest.mark.parametrize("method", [PREDICT, MODEL_INFER, HEALTH_CHECK])
def test_truncated_messages_are_invalid_argument_without_a_traceback_each(served, caplog, method):
    server, _client = served
    target = f"127.0.0.1:{server.port}"
    with pytest.raises(DecodeError):
        pb.PredictRequest.FromString(_truncated(PREDICT))  # the bytes really are malformed
    with caplog.at_level(logging.INFO):
        for _ in range(30):
            err = _call_raw(target, method, _truncated(method))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "request" in err.details()
            for leak in ("DecodeError", "class", "Traceback", "Unexpected", "google.protobuf"):
                assert leak not in err.details(), err.details()
    records = _server_records(caplog)
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert len(records) <= 2, [r.getMessage() for r in records]  # rate-limited, not one per message


@pytest.mark.parametrize("method", [PREDICT, MODEL_INFER])
def test_token_refuses_unauthenticated_callers_before_parsing(bundle_dir, tmp_path, caplog, method):
    from serving_helpers import make_repo

    repo = make_repo(tmp_path / "repo", bundle_dir)
    with BackgroundServer(config(repo, token="s3cret")) as server:
        target = f"127.0.0.1:{server.port}"
        with caplog.at_level(logging.INFO):
            for token in (None, "wrong"):
                for _ in range(10):
                    err = _call_raw(target, method, _truncated(method), token)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            records = _server_records(caplog)
            assert not records, [r.getMessage() for r in records]  # nothing logged for unauthenticated callers
        err = _call_raw(target, method, _truncated(method), "s3cret")  # authenticated: now it is parsed
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err


def test_truncated_message_on_a_stream_is_invalid_argument(served, caplog):
    """Server reflection is a bidirectional stream: a malformed message in it ends the call INVALID_ARGUMENT."""
    from grpc_reflection.v1alpha import reflection_pb2

    server, _client = served
    data = reflection_pb2.ServerReflectionRequest(file_containing_symbol="conceptlens.v1.ConceptLens")
    data = data.SerializeToString()[:-3]
    with caplog.at_level(logging.INFO), grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([data]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert not [r for r in _server_records(caplog) if r.exc_info]
