"""`conceptlens front`: nginx in front of the real server refuses calls over a method's in-flight limit with
RESOURCE_EXHAUSTED, the limit named and a retry pushback, and counts them; admitted calls get the server's own
replies; a burst of refused calls with large bodies does not break the admitted ones (no HTTP/2 flood close);
refusals are counted exactly, across log rotations, and served to Prometheus."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import replace

import grpc
import numpy as np
import pytest
from serving_helpers import SIZE, TEST_LIMITS, config, make_repo

from conceptlens.cli import main
from conceptlens.handlers.errors import InvalidInput
from conceptlens.server import front
from conceptlens.server.background import BackgroundServer
from conceptlens.server.front_metrics import RefusalLog
from conceptlens_client.v1 import conceptlens_service_pb2 as pb
from conceptlens_client.v1 import conceptlens_service_pb2_grpc as pb_grpc


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until something accepts on `port`; fails with the process's stderr if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"nothing listens on {port}: {err}") from None
            time.sleep(0.05)


def _predict(images: int, seed: int = 0) -> pb.PredictRequest:
    x = np.random.default_rng(seed).random((images, 3, SIZE, SIZE), dtype=np.float32)
    return pb.PredictRequest(model="small", images=[
        pb.Image(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.Tensor.FLOAT32, data=a.tobytes())) for a in x])


def test_the_config_limits_each_method_and_refuses_as_the_server_would(tmp_path):
    cfg = front.FrontConfig(listen="127.0.0.1:9000", backend="127.0.0.1:9001", directory=tmp_path,
                            limits=front.parse_limits(["predict=3", "Probe=2"]), retry_ms=15)
    text = front.render(cfg)
    assert "limit_conn predict 3;" in text and "limit_conn probe 2;" in text and "limit_conn explain 4;" in text
    assert "grpc-status 8" in text and "grpc-retry-pushback-ms 15" in text
    assert "Predict: the front's limit of 3 calls in flight is reached" in text
    assert "http2_body_preread_size 0;" in text  # refused clients never send their images
    assert "server 127.0.0.1:9001;" in text and "listen 127.0.0.1:9000 http2;" in text


@pytest.mark.parametrize("limits, field", [(["Predict"], "--limit"), (["Magic=3"], "--limit"),
                                            (["Predict=x"], "--limit"), (["Predict=0"], "--limit")])
def test_bad_limits_name_the_flag(limits, field):
    with pytest.raises(InvalidInput) as err:
        front.parse_limits(limits)
    assert err.value.field == field


def test_the_cli_prints_the_config_and_refuses_a_bad_address_in_one_line(tmp_path, capsys):
    assert main(["front", "--backend", "127.0.0.1:50052", "--dir", str(tmp_path), "--print-config"]) == 0
    assert "grpc_pass grpc://backend;" in capsys.readouterr().out
    assert main(["front", "--backend", "nowhere", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend" in err[0] and "HOST:PORT" in err[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        assert main(["front", "--backend", "127.0.0.1:50052", "--listen", busy, "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--listen" in err[0] and "in use" in err[0]
        assert main(["front", "--backend", "127.0.0.1:50052", "--listen", f"127.0.0.1:{_port()}", "--metrics-port",
                     busy.rsplit(":", 1)[1], "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metrics-port" in err[0] and "in use" in err[0]


@pytest.fixture
def fronted(bundle_dir, tmp_path):
    """(server, front port, front dir, nginx): the real server behind a real nginx front with Predict=1."""
    if front.nginx_binary() is None:
        pytest.skip("no nginx binary (Debian: apt-get install nginx-light); the front is optional")
    repo = make_repo(tmp_path / "repo", bundle_dir)
    limits = replace(TEST_LIMITS, max_images=64, max_message_bytes=8 << 20)
    with BackgroundServer(config(repo, limits=limits)) as server:
        cfg = front.FrontConfig(listen=f"127.0.0.1:{_port()}", backend=f"127.0.0.1:{server.port}",
                                directory=tmp_path / "front", limits=front.parse_limits(["Predict=1"]))
        nginx = front.start(cfg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port = int(cfg.listen.rsplit(":", 1)[1])
        try:
            _wait_listening(port, nginx)
            yield server, port, cfg.directory, nginx
        finally:
            nginx.terminate()
            nginx.wait(10)


def _hammer(port: int, request: pb.PredictRequest, seconds: float = 2.0, clients: int = 8):
    """(status counts, refused calls' errors, replies): closed-loop Predicts through `port`, a refused call retried
    at once as a busy client would."""
    codes: Counter = Counter()
    refusals, replies = [], []

    def client(stub) -> None:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            try:
                replies.append(stub.Predict(request, timeout=30))
            except grpc.RpcError as err:
                codes[err.code()] += 1
                refusals.append(err)
                continue
            codes[grpc.StatusCode.OK] += 1

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ConceptLensStub(channel)
        threads = [threading.Thread(target=client, args=(stub,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return codes, refusals, replies


def _front_refused(refusals: list) -> list:
    return [e for e in refusals if "front's limit of 1" in e.details()]


def test_calls_over_the_limit_are_refused_in_the_front_and_the_rest_pass_through(fronted):
    server, port, directory, _ = fronted
    # ~400 KB each: nginx closes a connection as an HTTP/2 flood when most bytes it receives are bodies of calls it
    # already refused, so the refused calls must not send theirs (http2_body_preread_size 0)
    request = _predict(32)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as direct:
        expected = pb_grpc.ConceptLensStub(direct).Predict(request, timeout=30)
    codes, refusals, replies = _hammer(port, request)
    assert replies and all(reply == expected for reply in replies)  # admitted calls get the server's own reply
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes  # no UNAVAILABLE
    front_refused = _front_refused(refusals)
    assert front_refused and all("Predict" in e.details() for e in front_refused)
    assert all(dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms") == "20" for e in front_refused)
    assert RefusalLog(directory).counts() == {"Predict": len(front_refused)}


def test_refusals_are_counted_exactly_across_log_rotations(fronted):
    """The log is renamed under the running nginx, which reopens it on SIGUSR1: no refusal is lost or counted twice,
    including those nginx appends to the renamed file before it reopens."""
    _, port, directory, nginx = fronted
    log = RefusalLog(directory, reopen=lambda: nginx.send_signal(signal.SIGUSR1), rotate_bytes=1)  # every read
    request, refused = _predict(1), 0
    for _ in range(3):
        refused += len(_front_refused(_hammer(port, request, seconds=1.0)[1]))
        log.counts()  # rotates
    time.sleep(0.5)  # nginx has reopened; what it wrote to refusals.log.1 meanwhile is read now
    assert refused and log.counts() == {"Predict": refused}
    assert (directory / "refusals.log.1").is_file() and (directory / "refusals.log").is_file()  # reopened


def test_the_front_command_serves_its_refusal_count_to_prometheus(bundle_dir, tmp_path):
    if front.nginx_binary() is None:
        pytest.skip("no nginx binary (Debian: apt-get install nginx-light); the front is optional")
    repo = make_repo(tmp_path / "repo", bundle_dir)
    with BackgroundServer(config(repo)) as server:
        port, metrics_port = _port(), _port()
        proc = subprocess.Popen([sys.executable, "-m", "conceptlens", "front", "--backend",
                                 f"127.0.0.1:{server.port}", "--listen", f"127.0.0.1:{port}", "--limit", "Predict=1",
                                 "--metrics-port", str(metrics_port), "--dir", str(tmp_path / "front")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert f"metrics on 127.0.0.1:{metrics_port}" in proc.stdout.readline()
            _wait_listening(port, proc)
            refused = len(_front_refused(_hammer(port, _predict(1))[1]))
            expected = f'conceptlens_front_refusals_total{{method="Predict"}} {float(refused)}'
            deadline = time.monotonic() + 5  # nginx logs a refusal just after its client has the status
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                    text = response.read().decode()
                if expected in text or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    assert refused > 0
    assert expected in text, text
    assert 'conceptlens_front_refusals_total{method="Probe"} 0.0' in text
    assert 'conceptlens_front_limit{method="Predict"} 1.0' in text


def test_the_front_command_drains_and_exits_on_sigterm(tmp_path):
    """SIGTERM (Kubernetes) becomes nginx's graceful SIGQUIT: the command exits 0, promptly, with nothing in flight."""
    if front.nginx_binary() is None:
        pytest.skip("no nginx binary (Debian: apt-get install nginx-light); the front is optional")
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "conceptlens", "front", "--backend", f"127.0.0.1:{_port()}",
                             "--listen", f"127.0.0.1:{port}", "--dir", str(tmp_path / "front")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "conceptlens front: 127.0.0.1:" in proc.stdout.readline()
        _wait_listening(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
