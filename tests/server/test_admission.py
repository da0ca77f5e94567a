"""Admission control on the real server: a method at its in-flight limit refuses at once with RESOURCE_EXHAUSTED,
a RetryInfo detail and a retry pushback, while other methods keep their share; a call that could not start before
its deadline is refused up front instead of queued to expire; the client's retry policy obeys the pushback."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from serving_helpers import SIZE, config, make_repo
from test_service import _scrape, _value

from conceptlens.cli import build_parser
from conceptlens.handlers.errors import InvalidInput
from conceptlens.server.background import BackgroundServer
from conceptlens.server.cli import build_config
from conceptlens_client import Client, ServiceError
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

LAYERS = ["layer1", "layer2", "layer3"]


def tensors(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32))


def heavy_explain(port: int, timeout: float = 60) -> grpc.Future:
    """An Explain that runs for seconds (three hidden layers of exact links per image), started in the background."""
    request = pb.ExplainRequest(model="small", layers=LAYERS, depth=3, top_k_units=4, candidates=32, images=[
        pb.Image(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=x.tobytes()))
        for x in tensors(4, seed=1)])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    future = pb_grpc.ConceptLensStub(channel).Explain.future(request, timeout=timeout)
    future.add_done_callback(lambda _f: channel.close())
    return future


def wait_inflight(port: int, method: str, count: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while _value(_scrape(port), "conceptlens_requests_in_flight", method=method) < count:
        assert time.monotonic() < end, f"{method} never reached {count} in flight"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def limited(bundle_dir, tmp_path_factory):
    """A server admitting one Explain at a time."""
    repo = make_repo(tmp_path_factory.mktemp("repo"), bundle_dir)
    cfg = config(repo)
    cfg = replace(cfg, explain=replace(cfg.explain, max_inflight=1))
    with BackgroundServer(cfg) as server:
        yield server


def test_a_method_at_its_limit_refuses_at_once_with_a_retry_hint_and_others_keep_serving(limited):
    server = limited
    busy = heavy_explain(server.port)
    try:
        wait_inflight(server.metrics_port, "Explain", 1)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ConceptLensStub(channel)
            request = pb.ExplainRequest(model="small", images=[pb.Image(tensor=pb.Tensor(
                shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=tensors(1)[0].tobytes()))])
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(request, timeout=30)
            refused_in = time.perf_counter() - start
            err = info.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Explain: 1 calls already in flight" in err.details()
            status = rpc_status.from_call(err)
            retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(retry) == 1
            info_msg = error_details_pb2.RetryInfo()
            retry[0].Unpack(info_msg)
            assert info_msg.retry_delay.ToTimedelta().total_seconds() > 0
            pushback = dict(err.trailing_metadata())["grpc-retry-pushback-ms"]
            assert int(pushback) >= 1
            # Predict has its own share: it is served while Explain is full
            predict = stub.Predict(pb.PredictRequest(model="small", images=request.images), timeout=30)
            assert len(predict.predictions) == 1
        assert not busy.done()
        # the refusal costs no decoding and no queueing; generous for a shared 2-core machine
        assert refused_in < 1.0, refused_in
        text = _scrape(server.metrics_port)
        assert _value(text, "conceptlens_rejected_requests_total", method="explain", reason="inflight") >= 1
        assert _value(text, "conceptlens_requests_total", method="Explain", code="RESOURCE_EXHAUSTED") >= 1
    finally:
        busy.cancel()


def test_the_client_retries_a_refusal_after_the_pushback(limited):
    server = limited
    before = _value(_scrape(server.metrics_port), "conceptlens_requests_total", method="Explain",
                    code="RESOURCE_EXHAUSTED")
    busy = heavy_explain(server.port)
    try:
        wait_inflight(server.metrics_port, "Explain", 1)
        with Client(f"127.0.0.1:{server.port}", attempts=3) as client, pytest.raises(ServiceError) as info:
            client.explain(tensors(1), "small", timeout=30)
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        busy.cancel()
    time.sleep(0.2)
    after = _value(_scrape(server.metrics_port), "conceptlens_requests_total", method="Explain",
                   code="RESOURCE_EXHAUSTED")
    assert after - before == 3  # one client call, three attempts refused


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_a_call_that_cannot_start_before_its_deadline_is_refused_up_front(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=60,
                                                        attempts=1) as client:
        client.explain(tensors(4, seed=1), "small", layers=LAYERS, depth=3, top_k_units=4, candidates=32)
        busy = heavy_explain(server.port)  # the explain batcher now knows a batch takes seconds
        try:
            wait_inflight(server.metrics_port, "Explain", 1)
            time.sleep(0.2)  # the heavy call has left the queue and is running
            start = time.perf_counter()
            with pytest.raises(ServiceError) as info:
                client.explain(tensors(1), "small", timeout=0.5)
            took = time.perf_counter() - start
        finally:
            busy.cancel()
        assert info.value.code == "RESOURCE_EXHAUSTED", info.value
        assert "after the call's deadline" in info.value.message
        assert took < 0.5  # refused, not left to expire
        text = _scrape(server.metrics_port)
        assert _value(text, "conceptlens_rejected_requests_total", method="explain",
                      reason="would_miss_deadline") == 1


@pytest.mark.slow  # a heavy Explain runs for seconds
def test_a_call_that_would_wait_over_the_queue_bound_is_refused_whatever_its_deadline(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    cfg = config(repo)
    cfg = replace(cfg, explain=replace(cfg.explain, max_queue_batches=0.25))
    with BackgroundServer(cfg) as server, Client(f"127.0.0.1:{server.port}", timeout=60, attempts=1) as client:
        client.explain(tensors(4, seed=1), "small", layers=LAYERS, depth=3, top_k_units=4, candidates=32)
        busy = heavy_explain(server.port)  # the explain batcher now knows a batch takes seconds
        try:
            wait_inflight(server.metrics_port, "Explain", 1)
            time.sleep(0.2)  # the heavy call is running: a new one would wait most of a batch time
            start = time.perf_counter()
            with pytest.raises(ServiceError) as info:
                client.explain(tensors(1), "small", timeout=60)  # a deadline it could easily meet
            took = time.perf_counter() - start
        finally:
            busy.cancel()
        assert info.value.code == "RESOURCE_EXHAUSTED", info.value
        assert "over the server's bound of 0.25 batch times" in info.value.message
        assert took < 0.5
        assert _value(_scrape(server.metrics_port), "conceptlens_rejected_requests_total", method="explain",
                      reason="queue_wait") == 1


def test_in_flight_gauge_returns_to_zero(limited):
    server = limited
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        threads = [threading.Thread(target=client.predict, args=(tensors(1), "small")) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert _value(_scrape(server.metrics_port), "conceptlens_requests_in_flight", method="Predict") == 0


def test_serve_max_inflight_sets_each_methods_limit(tmp_path):
    def build(*extra: str):
        argv = ["serve", "--models", str(tmp_path), *extra]
        return build_config(build_parser(argv).parse_args(argv))

    cfg = build("--max-inflight", "predict=5", "--max-inflight", "probe=2")
    assert (cfg.predict.max_inflight, cfg.explain.max_inflight, cfg.probe.max_inflight) == (5, 8, 2)
    for bad in ("predict", "predict=0", "predict=x", "listmodels=3", "predict=²"):
        with pytest.raises(InvalidInput, match="--max-inflight"):
            build("--max-inflight", bad)


def test_serve_max_queue_batches_bounds_every_methods_queue_wait(tmp_path):
    def build(*extra: str):
        argv = ["serve", "--models", str(tmp_path), *extra]
        return build_config(build_parser(argv).parse_args(argv))

    assert build().predict.max_queue_batches == 1.0
    cfg = build("--max-queue-batches", "1.5")
    assert (cfg.predict.max_queue_batches, cfg.explain.max_queue_batches, cfg.probe.max_queue_batches) == (1.5,) * 3
    for bad in ("-1", "nan"):
        with pytest.raises(InvalidInput, match="--max-queue-batches"):
            build("--max-queue-batches", bad)
