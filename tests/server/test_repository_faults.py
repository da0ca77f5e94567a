"""Repository faults on a real server: odd folder names are skipped while other models keep reloading, and a
served version whose files go bad on disk keeps serving from memory (logged and counted) until it is removed."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pytest
from serving_helpers import SIZE, config, make_repo
from test_lifecycle import publish, wait_for
from test_service import _scrape, _value

from conceptlens.server.background import BackgroundServer
from conceptlens_client import Client


def test_odd_folders_are_skipped_while_other_models_keep_reloading(bundle_dir, tmp_path, caplog):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    for odd in ("small/²", "small/٣", "small/x", "small/0", "small/01", "small/99999999999999999999",
                "²/1", "bad name/1", "ünï/1"):
        (repo / odd).mkdir(parents=True)
    (repo / "small" / "notes.txt").write_text("a stray file beside the versions")
    x = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="conceptlens.server.repository"), \
            BackgroundServer(config(repo, poll_interval_s=0.2)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        assert [m.model for m in client.models()] == ["small"]
        assert client.predict([x], "small").version == 1
        (repo / "other" / "²").mkdir(parents=True)  # appears while serving
        publish(bundle_dir, repo / "small" / "2")
        wait_for(lambda: client.get_model("small").version == 2, what="version 2 despite the odd folders")
        assert list(client.get_model("small").available_versions) == [1, 2]
        time.sleep(0.6)  # a few more polls: each odd folder is warned about once, not once per poll
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    for odd in ("small/²", "small/x", "small/01", "²", "bad name", "other/²"):
        assert sum(str(repo / odd) + ":" in m for m in skipped) == 1, (odd, skipped)


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_corrupt_in_place_version_keeps_serving_until_removed(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir, versions=(1, 2))
    x = np.random.default_rng(1).random((3, SIZE, SIZE), dtype=np.float32)
    with BackgroundServer(config(repo, poll_interval_s=0.2)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        failures = lambda: _value(_scrape(server.metrics_port), "conceptlens_model_load_failures_total",  # noqa: E731
                                  model="small")
        served = client.predict([x], "small", version=2)
        assert served.version == 2 and failures() == 0

        (repo / "small" / "2" / "weights.safetensors").write_bytes(b"corrupt")  # in place, as a bad rsync would
        wait_for(lambda: failures() >= 1, what="the reload failure to be counted")
        time.sleep(1.0)  # several more polls: the failed copy is neither retried nor dropped
        assert failures() == 1
        assert client.get_model("small").version == 2
        assert list(client.get_model("small").available_versions) == [1, 2]
        again = client.predict([x], "small", version=2)
        assert [c.logit for c in again.predictions[0].classes] == [c.logit for c in served.predictions[0].classes]

        (repo / "small" / "2" / "model.onnx").unlink()  # worse: a file goes missing
        wait_for(lambda: failures() >= 2, what="the second reload failure to be counted")
        time.sleep(0.6)
        assert client.predict([x], "small").version == 2

        shutil.rmtree(repo / "small" / "2")  # removal is the one way to unload a version
        wait_for(lambda: client.get_model("small").version == 1, what="version 2 to be unloaded")
        assert list(client.get_model("small").available_versions) == [1]
