"""Lifecycle: hot reload of the repository (new version swapped in, bad bundle refused while the rest keep
serving, removed version dropped) and SIGTERM (in-flight call completes, exit 0) on a subprocess server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import SIZE, config, make_repo
from test_service import _scrape, _value

from conceptlens.server.background import BackgroundServer
from conceptlens_client import Client
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def publish(src: Path, dst: Path) -> None:
    """Copy a bundle into the repository the way export does: a hidden sibling, then one rename."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def test_hot_reload(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    x = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    with BackgroundServer(config(repo, poll_interval_s=0.2)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        assert client.predict([x], "small").version == 1
        publish(bundle_dir, repo / "small" / "2")
        wait_for(lambda: client.get_model("small").version == 2, what="version 2")
        assert list(client.get_model("small").available_versions) == [1, 2]
        assert client.predict([x], "small").version == 2
        assert client.predict([x], "small", version=1).version == 1

        bad = tmp_path / "bad"
        shutil.copytree(bundle_dir, bad)
        (bad / "weights.safetensors").write_bytes(b"corrupt")
        publish(bad, repo / "small" / "3")
        failures = lambda: _value(_scrape(server.metrics_port), "conceptlens_model_load_failures_total",  # noqa: E731
                                  model="small")
        wait_for(lambda: failures() == 1, what="the bad bundle to be refused")
        assert client.get_model("small").version == 2  # the rest keep serving
        time.sleep(0.5)
        assert failures() == 1  # refused once, not retried while unchanged

        shutil.rmtree(repo / "small" / "2")
        wait_for(lambda: client.get_model("small").version == 1, what="version 2 to go")
        assert client.predict([x], "small").version == 1
        shutil.rmtree(repo / "small")
        wait_for(lambda: not client.models(), what="the model to go")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="models/small"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.slow
def test_sigterm_finishes_in_flight_calls_and_exits_zero(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--poll", "0", "--grace", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on port" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.rsplit(" ", 1)[1])
        x = np.random.default_rng(0).random((4, 3, SIZE, SIZE), dtype=np.float32)
        # a slow call: three hidden-layer levels of exact links for every image
        request = pb.ExplainRequest(
            model="small", layers=["layer1", "layer2", "layer3"], depth=3, top_k_units=4, candidates=32,
            images=[pb.Image(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=i.tobytes()))
                    for i in x])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ConceptLensStub(channel)
            stub.ListModels(pb.ListModelsRequest(), timeout=30)  # the server is up
            start = time.monotonic()
            future = stub.Explain.future(request, timeout=120)
            time.sleep(0.3)
            assert not future.done(), "the call finished before SIGTERM; make it slower"
            proc.send_signal(signal.SIGTERM)
            response = future.result()
            assert len(response.explanations) == 4
            assert len(response.explanations[0].trace.layers[2].units[0].contributors) == 4
            took = time.monotonic() - start
        assert proc.wait(timeout=60) == 0
        assert took > 0.3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
