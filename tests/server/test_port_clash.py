"""A used port (gRPC or metrics) is one line and exit 2 before any model loads; sharing the gRPC port takes
`--reuse-port` on every server that shares it. The second server is the real `conceptlens serve` in a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from serving_helpers import config, make_repo

from conceptlens.handlers.errors import InvalidInput
from conceptlens.server.app import ConceptLensServer
from conceptlens.server.background import BackgroundServer
from conceptlens.server.ports import check_free
from conceptlens_client import Client

SERVE = [sys.executable, "-m", "conceptlens", "serve", "--host", "127.0.0.1", "--poll", "0", "--probe-workers", "0"]


@pytest.fixture(scope="module")
def repo(bundle_dir, tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo"), bundle_dir)


@pytest.fixture(scope="module")
def first(repo):
    """The server already running: gRPC and metrics on free ports, sharing allowed (so only a second server's
    own flag decides whether it may share)."""
    with BackgroundServer(config(repo, reuse_port=True, probe_processes=0)) as server:
        yield server


def _second(repo, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, "--models", str(repo), *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("flag", "attr"), [("--port", "port"), ("--metrics-port", "metrics_port")])
def test_second_server_on_a_used_port_exits_2_with_one_line_and_loads_nothing(repo, first, flag, attr):
    port = getattr(first, attr)
    other = "--metrics-port" if flag == "--port" else "--port"
    done = _second(repo, flag, str(port), other, "0")
    assert done.returncode == 2, done
    assert done.stdout == ""  # never printed "listening"
    assert done.stderr.count("\n") == 1, done.stderr  # no traceback, no model-loading log lines
    assert f"port {port} is already in use" in done.stderr and f"choose another {flag}" in done.stderr
    with Client(f"127.0.0.1:{first.port}", timeout=30) as client:  # the first server is untouched
        assert [m.model for m in client.models()] == ["small"]


@pytest.mark.slow  # the second server loads the model (imports torch): ~23 s on 2 busy cores
def test_reuse_port_shares_the_grpc_port_on_request(repo, first):
    proc = subprocess.Popen([*SERVE, "--models", str(repo), "--port", str(first.port), "--reuse-port",
                             "--no-verify-onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # blocks until the server prints its result line (or exits)
        assert line.strip() == f"conceptlens serve: listening on port {first.port}", proc.stderr.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_the_server_itself_refuses_a_taken_port_before_loading(repo, first):
    """The bind inside ConceptLensServer.start (a port taken after the CLI's check) gives the same error."""
    for overrides, flag in (({"port": first.port}, "--port"), ({"metrics_port": first.metrics_port}, "--metrics-port")):
        server = ConceptLensServer(replace(config(repo), **overrides))
        with pytest.raises(InvalidInput, match=f"{flag}: port .* is already in use"):
            asyncio.run(server.start())
        assert server.repository.names() == []  # nothing loaded


def test_a_port_in_time_wait_is_free():
    """A port whose last listener closed its side of a connection first (TIME_WAIT, as after a server stops)
    is free for the next server: the check binds with SO_REUSEADDR as the real servers do (without it, the
    kernel answers EADDRINUSE here and a restart right after a stop would be refused)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            accepted.close()  # the listening side closes first: its end of the connection enters TIME_WAIT
            time.sleep(0.1)
    time.sleep(0.1)
    check_free("127.0.0.1", port, "--port")  # no error
