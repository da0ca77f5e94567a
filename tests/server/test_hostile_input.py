"""Hostile input on a real server over loopback: Unicode digits in Open Inference Protocol versions, truncated
protobuf messages (INVALID_ARGUMENT without a traceback per message), and bearer-token refusal before any parsing.
No call made here may end INTERNAL or UNKNOWN."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
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
