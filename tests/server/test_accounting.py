"""Truthful metrics: for a mix of calls ending every way a client sees (OK, INVALID_ARGUMENT, NOT_FOUND, a client
cancel, a passed deadline, an undecodable request, an oversize reply), the server's requests_total, scraped over
HTTP, moves by exactly what the client counted, code by code."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import grpc
import pytest
from serving_helpers import config, make_repo
from test_admission import heavy_explain, tensors
from test_service import _scrape

from conceptlens.server.background import BackgroundServer
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

METHOD = "/conceptlens.v1.ConceptLens/"


def counts(port: int) -> Counter:
    """requests_total by (method, code), summed over models."""
    out: Counter = Counter()
    for line in _scrape(port).splitlines():
        if line.startswith("conceptlens_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            out[(labels["method"].strip('"'), labels["code"].strip('"'))] += float(line.rsplit(" ", 1)[1])
    return out


def settle(port: int, before: Counter, calls: int, timeout: float = 10.0) -> Counter:
    """The server counts a call just after its status is sent: wait until all `calls` are counted."""
    end = time.monotonic() + timeout
    while True:
        delta = counts(port)
        delta.subtract(before)
        delta = +delta
        if sum(delta.values()) >= calls or time.monotonic() > end:
            return delta
        time.sleep(0.05)


def outcome(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def test_server_counts_match_client_counts(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    with BackgroundServer(config(repo)) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ConceptLensStub(channel)
        image = pb.Image(tensor=pb.Tensor(shape=[3, 32, 32], dtype=pb.Tensor.FLOAT32, data=tensors(1)[0].tobytes()))
        before = counts(server.metrics_port)
        seen: Counter = Counter()

        ok = pb.PredictRequest(model="small", images=[image])
        for _ in range(3):
            seen["Predict", outcome(lambda: stub.Predict(ok, timeout=30))] += 1
        seen["Predict", outcome(lambda: stub.Predict(
            pb.PredictRequest(model="small", images=[image], top_k=99), timeout=30))] += 1
        seen["Predict", outcome(lambda: stub.Predict(pb.PredictRequest(model="nope", images=[image]), timeout=30))] += 1
        raw = channel.unary_unary(METHOD + "Predict")  # no serializer: these bytes are not a PredictRequest
        seen["Predict", outcome(lambda: raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=30))] += 1

        # a client cancel while the Explain runs
        call = heavy_explain(server.port)
        time.sleep(0.5)
        call.cancel()
        seen["Explain", "CANCELLED"] += 1
        # a deadline that passes while the Explain runs
        seen["Explain", outcome(lambda: heavy_explain(server.port, timeout=0.5).result())] += 1
        assert seen["Explain", "DEADLINE_EXCEEDED"] == 1
        assert seen["Predict", "INVALID_ARGUMENT"] == 2 and seen["Predict", "NOT_FOUND"] == 1

        delta = settle(server.metrics_port, before, sum(seen.values()))
        assert dict(delta) == dict(seen)


def test_an_oversize_reply_is_counted_as_the_client_sees_it(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    cfg = config(repo)
    tiny = replace(cfg, limits=replace(cfg.limits, max_message_bytes=64))  # a GetModel reply is a few hundred bytes
    with BackgroundServer(tiny) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ConceptLensStub(channel)
        before = counts(server.metrics_port)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModel(pb.GetModelRequest(model="small"), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the server's message limit of 64" in info.value.details()
        delta = settle(server.metrics_port, before, 1)
        assert dict(delta) == {("GetModel", "RESOURCE_EXHAUSTED"): 1}
