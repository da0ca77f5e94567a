"""Fixtures for the deploy tests: third-party tools installed once per session, one exported bundle, and a real
ConceptLens server (grpc.aio on a free loopback port, Prometheus exposition on another) over a repository
holding it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from deploy_helpers import Tools, export_small, install_tools, make_repo

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
