"""The Open Inference Protocol (KServe v2 gRPC) on a real ConceptLens server, called by tritonclient from PyPI:
ServerLive, ServerReady, ModelReady, ModelMetadata and ModelInfer answer as Triton's clients expect, and ModelInfer
gives the same logits as ConceptLens' own Predict (same repository, same batcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import CLASSES, SIZE

from conceptlens_client import Client

CLIENT = Path(__file__).with_name("oip_client.py")


@pytest.fixture(scope="module")
def oip(server, tools, tmp_path_factory):
    """(images, what tritonclient saw) for two random images."""
    tools.require(modules=("tritonclient.grpc",))
    images = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    path = tmp_path_factory.mktemp("oip") / "images.npy"
    np.save(path, images)
    run = subprocess.run([sys.executable, str(CLIENT), f"127.0.0.1:{server.port}", "small", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return images, json.loads(run.stdout)


def test_health_and_readiness(oip):
    _, seen = oip
    assert seen["live"] is True and seen["ready"] is True
    assert seen["model_ready"] is True and seen["unknown_ready"] is False
    assert seen["server"]["name"] == "conceptlens"


def test_model_metadata(oip):
    _, seen = oip
    meta = seen["metadata"]
    assert meta["name"] == "small" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": ["-1", "3", str(SIZE), str(SIZE)]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", str(len(CLASSES))]}]


def test_infer_matches_predict(oip, server):
    images, seen = oip
    logits = np.asarray(seen["logits"], dtype=np.float32)
    assert logits.shape == (2, len(CLASSES)) and seen["ids"][0] == "r-1"
    with Client(f"127.0.0.1:{server.port}") as client:
        response = client.predict(list(images), "small", top_k=len(CLASSES))
    for row, prediction in zip(logits, response.predictions, strict=True):
        expected = {c.index: c.logit for c in prediction.classes}
        np.testing.assert_allclose(row, [expected[i] for i in range(len(CLASSES))], atol=1e-5)
    # UINT8 input is divided by 255: the rounded copy predicts (nearly) the same logits.
    np.testing.assert_allclose(np.asarray(seen["logits_uint8"]), logits, atol=0.05)


def test_errors_name_the_problem(oip):
    _, seen = oip
    errors = seen["errors"]
    assert errors["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].shape" in errors["bad_shape"]["message"]
    assert errors["out_of_range"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "[0, 1]" in errors["out_of_range"]["message"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "small" in errors["unknown_model"]["message"]  # the error lists what is served


def test_oip_calls_are_counted(oip, server):
    registry = server.metrics.registry
    infer_ok = registry.get_sample_value("conceptlens_requests_total",
                                         {"method": "ModelInfer", "model": "small", "code": "OK"})
    assert infer_ok == 2
    bad = registry.get_sample_value("conceptlens_requests_total",
                                    {"method": "ModelInfer", "model": "small", "code": "INVALID_ARGUMENT"})
    assert bad == 2


# --- the tensor checks alone (no server): the typed-contents path tritonclient never takes --------------------

def _request(datatype: str, shape: list[int], **contents) -> object:
    from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2 as oip_pb

    tensor = oip_pb.ModelInferRequest.InferInputTensor(name="images", datatype=datatype, shape=shape,
                                                       contents=oip_pb.InferTensorContents(**contents))
    return oip_pb.ModelInferRequest(model_name="small", inputs=[tensor])


def test_decode_input_typed_contents():
    from conceptlens.server.oip import decode_input

    values = np.linspace(0, 1, 2 * 3 * 4 * 4, dtype=np.float32)
    images = decode_input(_request("FP32", [2, 3, 4, 4], fp32_contents=values.tolist()), (3, 4, 4), 8)
    np.testing.assert_array_equal(images, values.reshape(2, 3, 4, 4))
    uint8 = decode_input(_request("UINT8", [1, 3, 4, 4], uint_contents=[255] * 48), (3, 4, 4), 8)
    assert uint8.dtype == np.float32 and float(uint8.min()) == 1.0


@pytest.mark.parametrize(("datatype", "shape", "contents", "field"), [
    ("FP32", [1, 3, 4, 4], {"fp32_contents": [0.5] * 47}, "inputs[0].contents.fp32_contents"),
    ("UINT8", [1, 3, 4, 4], {"uint_contents": [256] * 48}, "inputs[0].contents.uint_contents"),
    ("FP64", [1, 3, 4, 4], {"fp64_contents": [0.5] * 48}, "inputs[0].datatype"),
    ("FP32", [9, 3, 4, 4], {"fp32_contents": [0.5] * 432}, "inputs[0].shape"),
    ("FP32", [1, 4, 4], {"fp32_contents": [0.5] * 16}, "inputs[0].shape"),
    ("FP32", [1, 3, 4, 4], {"fp32_contents": [float("nan")] * 48}, "inputs[0]"),
])
def test_decode_input_refusals_name_the_field(datatype, shape, contents, field):
    from conceptlens.handlers.errors import InvalidInput
    from conceptlens.server.oip import decode_input

    with pytest.raises(InvalidInput) as err:
        decode_input(_request(datatype, shape, **contents), (3, 4, 4), 8)
    assert err.value.field == field
