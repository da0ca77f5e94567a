"""What each entry point loads, checked in a fresh interpreter: the README's architecture claims
(docs/design.md §1). The server process holds torch (Explain's hidden-layer influences need the torch model)
but never the offline `training` package; the client needs neither."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout))


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_server_holds_torch_but_not_training() -> None:
    loaded = _loaded("conceptlens.server.app")
    assert "torch" in loaded
    assert not any(name.startswith("conceptlens.training") for name in loaded)


def test_client_needs_only_the_proto() -> None:
    loaded = _loaded("conceptlens_client.client")
    assert "grpc" in loaded
    assert not {"torch", "onnxruntime"} & loaded
    assert not any(name.startswith("conceptlens.") for name in loaded)
