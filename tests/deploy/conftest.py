"""Fixtures for the deploy tests: third-party tools installed once per session, one exported bundle, and a real
ConceptLens server (grpc.aio on a free loopback port, Prometheus exposition on another) over a repository
holding it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from deploy_helpers import Tools, export_small, free_port, install_tools, make_repo, wait_for

from conceptlens.server.background import BackgroundServer
from conceptlens.server.config import Limits, ServerConfig


@pytest.fixture(scope="session")
def tools() -> Tools:
    return install_tools()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return export_small(tmp_path_factory.mktemp("deploy-bundles") / "small" / "1")


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """A running ConceptLensServer; read `.port` and `.metrics_port`."""
    repo = make_repo(tmp_path_factory.mktemp("deploy-repo"), bundle_dir)
    config = ServerConfig(models=repo, host="127.0.0.1", port=0, metrics_port=0, poll_interval_s=0, grace_s=1.0,
                          limits=Limits(max_images=8, max_message_bytes=1 << 22))
    with BackgroundServer(replace(config)) as running:
        yield running


@dataclass(frozen=True)
class ServedProcess:
    port: int
    metrics_port: int
    process: subprocess.Popen


@pytest.fixture(scope="session")
def cli_server(bundle_dir, tmp_path_factory):
    """`conceptlens serve` as the container runs it (the image's ENTRYPOINT and flags), in its own process.
    Teardown sends SIGTERM, as `docker stop` and Kubernetes do, and requires the graceful exit code 0."""
    repo = make_repo(tmp_path_factory.mktemp("cli-repo"), bundle_dir)
    metrics_port = free_port()
    log = (tmp_path_factory.mktemp("cli-log") / "serve.log").open("w+")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("conceptlens")), "serve", "--models", str(repo),
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port),
                             "--poll", "0", "--grace", "1"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # "conceptlens serve: listening on port N" once serving
        found = re.search(r"listening on port (\d+)", line)
        if not found:
            log.seek(0)
            raise AssertionError(f"serve did not start: {line!r}\n{log.read()[-3000:]}")
        wait_for(lambda: proc.poll() is None, 5, "serve exited")
        yield ServedProcess(int(found.group(1)), metrics_port, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert code == 0, f"SIGTERM should drain and exit 0, got {code}"
        log.close()
