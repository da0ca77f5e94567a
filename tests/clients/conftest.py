"""The client tests reuse the service tests' bundle helpers and run a real server on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from serving_helpers import config, export, make_model, make_repo

from conceptlens.server.background import BackgroundServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = export(make_model(), tmp_path_factory.mktemp("bundles") / "small" / "1")
    repo = make_repo(tmp_path_factory.mktemp("repo"), bundle)
    with BackgroundServer(config(repo)) as srv:
        yield srv
