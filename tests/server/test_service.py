"""The real server on loopback, called with the real client: predictions, exact influence checked against torch,
bad requests, health, reflection and metrics. No mocks."""

from __future__ import annotations

import io
import re
import struct
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from serving_helpers import CLASSES, SIZE

from conceptlens.handlers.hooks import capture, override
from conceptlens_client import ServiceError
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

# Influence is computed by ONNX Runtime (last layer) or by torch on the server's copy of the weights (hidden
# layers) and compared with torch here: float32 agreement of logits of magnitude ~1 is ~1e-6; we allow 2e-4.
ATOL = 2e-4


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def ablated_logit(model, x: torch.Tensor, layer: str, unit: int, baseline: float, c: int) -> float:
    """f_c(x | A_unit := baseline), re-running the whole model (not the server's suffix trick)."""

    def replace(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, unit] = baseline
        return out

    with torch.no_grad(), override(model, layer, replace):
        return float(model(x)[0, c])


def test_models_lists_and_describes_the_bundle(served):
    _, client = served
    (m,) = client.models()
    assert (m.name, m.model, m.version, list(m.available_versions)) == ("models/small/versions/1", "small", 1, [1])
    assert list(m.classes) == CLASSES and m.architecture == "small_cnn" and m.state == pb.Model.READY
    assert [(layer.name, layer.units) for layer in m.layers] == [("layer1", 32), ("layer2", 64), ("layer3", 128)]
    assert m.layers[2].detectors == len(range(0, 128, 3))
    assert m.metrics["clean_accuracy"] == pytest.approx(0.25)
    assert client.get_model("small", 1) == m


def test_predict_matches_torch(served, model):
    _, client = served
    x = images(3)
    response = client.predict(list(x), "small", top_k=len(CLASSES))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert (response.model, response.version) == ("small", 1)
    for row, pred in zip(want, response.predictions, strict=True):
        assert [c.index for c in pred.classes] == list(np.argsort(-row))
        got = {c.index: c.logit for c in pred.classes}
        np.testing.assert_allclose([got[i] for i in range(len(CLASSES))], row, atol=ATOL)
        assert sum(c.probability for c in pred.classes) == pytest.approx(1.0, abs=1e-5)


def test_encoded_png_is_decoded_like_the_raw_tensor(served):
    _, client = served
    pixels = (images(1)[0] * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, format="PNG")
    a = client.predict([buf.getvalue()], "small").predictions[0]
    b = client.predict([pixels], "small").predictions[0]
    assert [c.index for c in a.classes] == [c.index for c in b.classes]
    np.testing.assert_allclose([c.logit for c in a.classes], [c.logit for c in b.classes], atol=1e-5)


def test_last_layer_delta_equals_direct_ablation_in_torch(served, model):
    server, client = served
    x = images(2, seed=1)
    response = client.explain(list(x), "small", layers=["layer3"], top_k_units=5)
    baselines = server.repository.resolve("small").baselines["layer3"]
    for i, exp in enumerate(response.explanations):
        xi = torch.from_numpy(x[i : i + 1])
        (layer,) = exp.trace.layers
        assert layer.method == "exact-last-layer" and len(layer.units) == 5
        c = exp.trace.target.index
        with torch.no_grad():
            f = float(model(xi)[0, c])
        all_deltas = [f - ablated_logit(model, xi, "layer3", k, float(baselines[k]), c) for k in range(128)]
        assert [u.unit for u in layer.units] == list(np.argsort(-np.array(all_deltas), kind="stable")[:5])
        for u in layer.units:
            assert u.exact and u.delta == pytest.approx(all_deltas[u.unit], abs=ATOL)
            assert u.baseline == pytest.approx(baselines[u.unit])
        positive = sum(d for d in all_deltas if d > 0)
        assert layer.share == pytest.approx(sum(max(u.delta, 0) for u in layer.units) / positive, abs=1e-3)


def test_hidden_layer_delta_equals_rerun_with_unit_at_baseline(served, model):
    server, client = served
    x = images(1, seed=2)
    xt = torch.from_numpy(x)
    # candidates = every unit, so the top-k must be the true top-k by exact Δ
    exp = client.explain(list(x), "small", layers=["layer2"], top_k_units=4, candidates=64,
                         target_class="tree").explanations[0]
    baselines = server.repository.resolve("small").baselines["layer2"]
    (layer,) = exp.trace.layers
    assert layer.method == "suffix-rerun" and exp.trace.target.label == "tree"
    with torch.no_grad():
        f = float(model(xt)[0, 2])
    exact = [f - ablated_logit(model, xt, "layer2", k, float(baselines[k]), 2) for k in range(64)]
    assert [u.unit for u in layer.units] == list(np.argsort(-np.array(exact), kind="stable")[:4])
    for u in layer.units:
        assert u.delta == pytest.approx(exact[u.unit], abs=ATOL)
    # with few candidates the returned Δs are still exact for the units returned
    few = client.explain(list(x), "small", layers=["layer1"], top_k_units=3, candidates=6).explanations[0]
    c = few.trace.target.index
    with torch.no_grad():
        f = float(model(xt)[0, c])
    b1 = server.repository.resolve("small").baselines["layer1"]
    for u in few.trace.layers[0].units:
        assert u.delta == pytest.approx(f - ablated_logit(model, xt, "layer1", u.unit, float(b1[u.unit]), c), abs=ATOL)


def test_multi_layer_links_are_exact_contributions_to_the_upper_unit(served, model):
    server, client = served
    x = images(1, seed=3)
    xt = torch.from_numpy(x)
    exp = client.explain(list(x), "small", layers=["layer2", "layer3"], top_k_units=2, depth=2,
                         candidates=64).explanations[0]
    assert [lt.layer for lt in exp.trace.layers] == ["layer2", "layer3"]
    b2 = server.repository.resolve("small").baselines["layer2"]
    top = exp.trace.layers[1].units[0]
    assert len(top.contributors) == 2

    def upper_mean(replace_unit: int | None) -> float:
        with torch.no_grad(), capture(model, ["layer3"]) as acts:
            if replace_unit is None:
                model(xt)
            else:
                def fn(out, k=replace_unit):
                    out = out.clone()
                    out[:, k] = float(b2[k])
                    return out

                with override(model, "layer2", fn):
                    model(xt)
            return float(acts["layer3"][0, top.unit].mean())

    base = upper_mean(None)
    for contributor in top.contributors:
        assert contributor.layer == "layer2"
        assert contributor.delta == pytest.approx(base - upper_mean(contributor.unit), abs=ATOL)


def test_maps_summary_and_plausibility(served):
    _, client = served
    exp = client.explain(list(images(1, seed=4)), "small", include_maps=True, map_size=16,
                         top_k_units=8).explanations[0]
    units = exp.trace.layers[0].units
    assert all((u.map.height, u.map.width, len(u.map.values)) == (16, 16, 256) for u in units)
    native = client.explain(list(images(1, seed=4)), "small", include_maps=True).explanations[0]
    assert (native.trace.layers[0].units[0].map.height, len(native.trace.layers[0].units[0].map.values)) == (4, 16)
    label = exp.trace.target.label
    assert re.fullmatch(rf"{label}: (units for .+|layer3 units .+) carried \d+% of the score", exp.trace.summary)
    named = [u for u in units if u.concept and u.delta > 0]
    if named:
        assert f"{named[0].concept} (IoU " in exp.trace.summary
        assert exp.trace.HasField("plausibility") and 0.0 <= exp.trace.plausibility <= 1.0
        assert exp.trace.adversarial == (exp.trace.plausibility < 0.5)


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _png(size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((images(1)[0] * 255).astype(np.uint8).transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _tensor(shape, dtype=pb.Tensor.FLOAT32, fill: float = 0.5, data: bytes | None = None) -> pb.Image:
    if data is None:
        data = np.full(shape, fill, dtype="<f4" if dtype == pb.Tensor.FLOAT32 else "<u1").tobytes()
    return pb.Image(tensor=pb.Tensor(shape=list(shape), dtype=dtype, data=data))


GOOD = _tensor((3, SIZE, SIZE))
NAN = np.full((3, SIZE, SIZE), 0.5, "<f4")
NAN[0, 1, 1] = np.nan
INF = np.full((3, SIZE, SIZE), 0.5, "<f4")
INF[2, 0, 0] = np.inf

# (case, method, request, code, substring of the message)
BAD_REQUESTS = [
    ("empty", "Predict", pb.PredictRequest(model="small"), "INVALID_ARGUMENT", "images: empty"),
    ("no model", "Predict", pb.PredictRequest(images=[GOOD]), "INVALID_ARGUMENT", "model: required"),
    ("no source", "Predict", pb.PredictRequest(model="small", images=[pb.Image()]), "INVALID_ARGUMENT",
     "images[0]: no image given"),
    ("wrong dtype", "Predict", pb.PredictRequest(model="small", images=[_tensor((3, SIZE, SIZE), dtype=0)]),
     "INVALID_ARGUMENT", "images[0].tensor.dtype: must be UINT8 or FLOAT32"),
    ("wrong shape", "Predict", pb.PredictRequest(model="small", images=[GOOD, _tensor((3, SIZE, SIZE + 1))]),
     "INVALID_ARGUMENT", "images[1].tensor.shape: must be [3, 32, 32]"),
    ("short data", "Predict", pb.PredictRequest(model="small", images=[_tensor((3, SIZE, SIZE), data=b"\0" * 9)]),
     "INVALID_ARGUMENT", "images[0].tensor.data: holds 9 bytes"),
    ("NaN", "Predict", pb.PredictRequest(model="small", images=[_tensor((3, SIZE, SIZE), data=NAN.tobytes())]),
     "INVALID_ARGUMENT", "images[0].tensor.data: contains NaN or inf"),
    ("inf", "Explain", pb.ExplainRequest(model="small", images=[_tensor((3, SIZE, SIZE), data=INF.tobytes())]),
     "INVALID_ARGUMENT", "contains NaN or inf"),
    ("out of range", "Predict", pb.PredictRequest(model="small", images=[_tensor((3, SIZE, SIZE), fill=2.0)]),
     "INVALID_ARGUMENT", "must lie in [0, 1]"),
    ("undecodable", "Predict", pb.PredictRequest(model="small", images=[pb.Image(encoded=b"not an image")]),
     "INVALID_ARGUMENT", "images[0].encoded: not a decodable PNG or JPEG"),
    ("truncated", "Predict", pb.PredictRequest(model="small", images=[pb.Image(encoded=_png()[:80])]),
     "INVALID_ARGUMENT", "images[0].encoded: truncated or corrupt"),
    ("bomb", "Predict", pb.PredictRequest(model="small", images=[pb.Image(encoded=_png_claiming(20000, 20000))]),
     "INVALID_ARGUMENT", "images[0].encoded: "),
    ("unknown model", "Predict", pb.PredictRequest(model="nope", images=[GOOD]), "NOT_FOUND",
     "unknown model 'nope'; valid: small"),
    ("unknown version", "Explain", pb.ExplainRequest(model="small", version=7, images=[GOOD]), "NOT_FOUND",
     "unknown version of model 'small' '7'; valid: 1"),
    ("unknown layer", "Explain", pb.ExplainRequest(model="small", images=[GOOD], layers=["layer9"]), "NOT_FOUND",
     "unknown layer 'layer9'"),
    ("k = 0 is default, k < 0", "Predict", pb.PredictRequest(model="small", images=[GOOD], top_k=-1),
     "INVALID_ARGUMENT", "top_k: must be in 1..4"),
    ("k > classes", "Predict", pb.PredictRequest(model="small", images=[GOOD], top_k=5), "INVALID_ARGUMENT",
     "top_k: must be in 1..4, got 5"),
    ("k > units", "Explain", pb.ExplainRequest(model="small", images=[GOOD], layers=["layer1", "layer3"],
                                                top_k_units=33), "INVALID_ARGUMENT", "top_k_units: must be in 1..32"),
    ("unknown target", "Explain", pb.ExplainRequest(model="small", images=[GOOD], target_class="cat"),
     "INVALID_ARGUMENT", "target_class: unknown class 'cat'"),
    ("depth too deep", "Explain", pb.ExplainRequest(model="small", images=[GOOD], depth=2), "INVALID_ARGUMENT",
     "depth: must be in 1..1"),
    ("too many images", "Predict", pb.PredictRequest(model="small", images=[GOOD] * 5), "INVALID_ARGUMENT",
     "images: 5 images, over the server's limit of 4"),
    ("oversize message", "Predict", pb.PredictRequest(model="small", images=[pb.Image(encoded=b"\x89" * (2 << 20))]),
     "RESOURCE_EXHAUSTED", ""),
    ("negative page", "ListModels", pb.ListModelsRequest(page_size=-1), "INVALID_ARGUMENT", "page_size"),
    ("too much linking", "Explain", pb.ExplainRequest(model="small", images=[GOOD], top_k_units=20, depth=3,
                                                       layers=["layer1", "layer2", "layer3"]), "RESOURCE_EXHAUSTED",
     "links 420 units per image, over the server's cap of 256"),
    ("probe without attack", "Probe", pb.ProbeRequest(model="small", images=[GOOD]), "INVALID_ARGUMENT",
     "attack: required"),
    ("bad version", "GetModel", pb.GetModelRequest(model="small", version=-1), "INVALID_ARGUMENT", "version"),
]


@pytest.mark.parametrize(("case", "method", "request_", "code", "message"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_their_code_and_the_server_keeps_serving(served, case, method, request_, code, message):
    server, client = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                               options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = pb_grpc.ConceptLensStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request_, timeout=30)
        assert info.value.code().name == code, info.value.details()
        assert message in (info.value.details() or ""), info.value.details()
    assert client.predict([images(1)[0]], "small").predictions[0].classes  # still serving


def test_bad_request_carries_a_bad_request_detail(served):
    from grpc_status import rpc_status

    server, _ = served
    from google.rpc import error_details_pb2

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ConceptLensStub(channel).Predict(pb.PredictRequest(model="small"), timeout=30)
    status = rpc_status.from_call(info.value)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "images"


def test_client_error_is_one_line(served):
    _, client = served
    with pytest.raises(ServiceError) as info:
        client.predict([images(1)[0]], "missing")
    assert info.value.code == "NOT_FOUND" and "\n" not in str(info.value)


def test_health_and_reflection(served):
    server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "conceptlens.v1.ConceptLens", "models/small"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="models/nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "conceptlens.v1.ConceptLens" in {s.name for s in reply.list_services_response.service}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_and_batches_form(served):
    server, client = served
    before = _scrape(server.metrics_port)
    x = images(1)[0]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.predict([x], "small"), range(24)))
    with pytest.raises(ServiceError):
        client.predict([x], "small", top_k=99)
    # an aborted call's status reaches the client before the interceptor's `finally` has counted it: wait a moment
    bad = dict(method="Predict", model="small", code="INVALID_ARGUMENT")
    for _ in range(50):
        after = _scrape(server.metrics_port)
        if _value(after, "conceptlens_requests_total", **bad) > _value(before, "conceptlens_requests_total", **bad):
            break
        time.sleep(0.05)
    ok = dict(method="Predict", model="small", code="OK")
    assert _value(after, "conceptlens_requests_total", **ok) - _value(before, "conceptlens_requests_total", **ok) == 24
    assert _value(after, "conceptlens_requests_total", **bad) > _value(before, "conceptlens_requests_total", **bad)
    lat = dict(method="Predict", model="small")
    assert _value(after, "conceptlens_request_duration_seconds_count", **lat) >= 25
    bs = dict(model="small", method="predict")
    images_run = _value(after, "conceptlens_batch_size_sum", **bs) - _value(before, "conceptlens_batch_size_sum", **bs)
    batches = _value(after, "conceptlens_batch_size_count", **bs) - _value(before, "conceptlens_batch_size_count", **bs)
    assert images_run == 24 and batches <= 24
    assert _value(after, "conceptlens_model_loaded", model="small") == 1
    assert _value(after, "conceptlens_model_version", model="small") == 1
    assert _value(after, "conceptlens_inference_duration_seconds_count", model="small", backend="onnxruntime") > 0


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_slow_explain_does_not_hold_up_predict(served):
    """Separate queues and executors per method: a long hidden-layer Explain is in flight while Predicts pass."""
    server, client = served
    x = images(4, seed=5)
    request = pb.ExplainRequest(
        model="small", layers=["layer1", "layer2", "layer3"], depth=3, top_k_units=4, candidates=32,
        images=[pb.Image(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=i.tobytes()))
                for i in x])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        slow = pb_grpc.ConceptLensStub(channel).Explain.future(request, timeout=120)
        time.sleep(0.1)
        for _ in range(3):
            assert client.predict([x[0]], "small").predictions
        assert not slow.done(), "Predict waited for the Explain in flight"
        assert len(slow.result().explanations) == 4


def test_explain_job_past_its_deadline_stops_between_images_alone(served):
    """The runner checks each job's deadline between images; a late job fails alone, its batch-mates finish."""
    from conceptlens.server.errors import DeadlineExpired
    from conceptlens.server.jobs import ExplainJob

    server, _ = served
    runtime = server.repository.resolve("small")
    x = images(2, seed=6)
    late = ExplainJob(x, ("layer3",), 3, None, False, 0, 1, 8, deadline=time.monotonic() - 1)
    fine = ExplainJob(x, ("layer3",), 3, None, False, 0, 1, 8, deadline=None)
    out_late, out_fine = server.servicer.runners.explain(runtime, [late, fine])
    assert isinstance(out_late, DeadlineExpired) and "deadline passed while tracing image 0 of 2" in str(out_late)
    assert len(out_fine.traces) == 2


def test_client_deadline_on_a_slow_explain(served):
    _, client = served
    with pytest.raises(ServiceError) as info:
        client.explain(list(images(4, seed=7)), "small", layers=["layer1", "layer2", "layer3"], depth=3,
                       top_k_units=4, timeout=0.05)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert client.predict([images(1)[0]], "small").predictions  # and it keeps serving
