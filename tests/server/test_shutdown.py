"""Bounded shutdown: SIGTERM with an Explain in flight that would run for a minute ends the process within
--grace + 2 s, by itself (exit 0: the trace stopped at its next check, not the watchdog's exit 1), and the caller
gets UNAVAILABLE. A probe running on a server thread (--probe-workers 0) checks only its deadline: the process
still ends within the same bound (it exits without waiting for that thread)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from serving_helpers import SIZE, make_repo
from test_admission import LAYERS, tensors

from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc

GRACE = 1.0


def start_server(repo, log, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--poll", "0", "--grace", str(GRACE), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)


def _sigterm_during(repo, tmp_path, method: str, request, *extra: str) -> None:
    """Start a server, put `request` in flight on `method`, SIGTERM the server 1.5 s later, and check that the
    process exits 0 within GRACE + 2 s and that the caller gets UNAVAILABLE."""
    log = (tmp_path / "server.log").open("w+")
    proc = start_server(repo, log, *extra)
    try:
        line = proc.stdout.readline()
        assert "listening on port" in line, line
        port = int(line.rsplit(" ", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ConceptLensStub(channel)
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
            future = getattr(stub, method).future(request, timeout=300)
            time.sleep(1.5)
            assert not future.done(), f"the {method} call finished before SIGTERM; make it heavier"
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            took = time.monotonic() - start
            assert future.exception(timeout=10).code() == grpc.StatusCode.UNAVAILABLE
        log.seek(0)
        assert code == 0, log.read()
        assert took <= GRACE + 2.0, f"exited {took:.2f}s after SIGTERM with --grace {GRACE}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _images(n: int, seed: int) -> list[pb.Image]:
    return [pb.Image(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=x.tobytes()))
            for x in tensors(n, seed=seed)]


@pytest.mark.slow
def test_sigterm_exits_within_grace_with_a_heavy_explain_in_flight(bundle_dir, tmp_path):
    # 32 images x three hidden layers of exact links: about a minute of tracing on two cores
    request = pb.ExplainRequest(model="small", layers=LAYERS, depth=3, top_k_units=4, candidates=32,
                                images=_images(32, seed=2))
    _sigterm_during(make_repo(tmp_path / "repo", bundle_dir), tmp_path, "Explain", request)


@pytest.mark.slow
def test_sigterm_exits_within_grace_with_a_probe_on_a_server_thread(bundle_dir, tmp_path):
    # 8 images x 200 steps x 5 restarts of PGD on a server thread: far longer than the grace
    request = pb.ProbeRequest(model="small", attack=pb.AttackSpec(
        kind=pb.AttackSpec.PGD, epsilon=8 / 255, steps=200, restarts=5), images=_images(8, seed=3))
    _sigterm_during(make_repo(tmp_path / "repo", bundle_dir), tmp_path, "Probe", request, "--probe-workers", "0")
