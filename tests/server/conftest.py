"""Fixtures for the service tests: a real grpc.aio server on a free loopback port over a temporary repository
holding one exported small_cnn bundle, called through the real client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_helpers import config, export, make_model, make_repo

from conceptlens.server.background import BackgroundServer
from conceptlens_client import Client


@pytest.fixture(scope="session")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="session")
def bundle_dir(model, tmp_path_factory) -> Path:
    """One exported bundle, copied into repositories by the fixtures below."""
    return export(model, tmp_path_factory.mktemp("bundles") / "small" / "1")


@pytest.fixture(scope="module")
def served(bundle_dir, tmp_path_factory):
    """(server, client) on a repository holding small v1; shared by a module's tests, which leave it serving."""
    repo = make_repo(tmp_path_factory.mktemp("repo"), bundle_dir)
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        yield server, client
