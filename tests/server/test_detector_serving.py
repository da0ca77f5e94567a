"""The adversarial score over the real server: a v1 manifest without the detector fields still loads and serves
(score = 1 − plausibility, flag below the plausibility threshold), a detector entry written before per-class
thresholds still flags on its global threshold while one with `class_thresholds` flags on the predicted class's,
a bundle calibrated in place serves the detector's score with its calibrated flag, equal to the offline
computation, and a manifest's per-class plausibility calibration is what the served plausibility reads (without
it, the raw plausibility as before). Real gRPC server on loopback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from serving_helpers import CLASSES, SIZE, config, make_repo

from conceptlens.handlers import detector as D
from conceptlens.handlers import plausibility as PL
from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.server.background import BackgroundServer
from conceptlens.training.calibrate import fit_detector, write_detector, write_plausibility
from conceptlens_client import Client


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def test_a_manifest_without_the_detector_fields_loads_and_serves(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    manifest = json.loads((repo / "small" / "1" / "manifest.json").read_text())
    assert "adversarial_detector" not in manifest and manifest["schema_version"] == 1  # written as before
    assert "plausibility_calibration" not in manifest  # and without the per-class plausibility calibration
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        explanations = client.explain(list(_images(4, 5)), "small", top_k_units=128).explanations
    assert len(explanations) == 4
    for exp in explanations:
        trace = exp.trace
        if trace.HasField("plausibility"):
            assert trace.adversarial_score == pytest.approx(1 - trace.plausibility, abs=1e-6)
            assert trace.adversarial == (trace.plausibility < 0.5)
        else:
            assert not trace.HasField("adversarial_score") and not trace.adversarial  # nothing to score with
    assert any(exp.trace.HasField("plausibility") for exp in explanations)


def _two_class_images(repo):
    """Version 1's runtime, four plain-colour images of which the untrained model predicts at least two classes,
    and the class predicted for the first."""
    runtime = ModelRuntime(load_bundle(repo / "small" / "1", verify_onnx=False), device="cpu")
    rng = np.random.default_rng(7)
    pool = rng.random((32, 3, 1, 1), dtype=np.float32) * np.ones((1, 1, SIZE, SIZE), dtype=np.float32)
    predicted = runtime.forward(pool).logits.argmax(axis=1)
    first = int(predicted[0])
    return runtime, pool[[0, *[i for i in range(1, len(pool)) if predicted[i] != first][:1], 1, 2]], first


def test_the_flag_uses_the_predicted_class_threshold_and_older_entries_the_global_one(bundle_dir, tmp_path):
    """Version 1 holds a max-softmax detector entry as written before per-class thresholds (global threshold only),
    version 2 the same detector with `class_thresholds`: 0 for the first image's predicted class (always flagged),
    1 for the others (never), and a global threshold of 1 that would flag nothing."""
    repo = make_repo(tmp_path / "repo", bundle_dir, versions=(1, 2))
    runtime, x, first = _two_class_images(repo)
    k = len(CLASSES)
    detector = D.Detector("max_softmax", "layer3", 0.0, 0.05, {"max_softmax": np.zeros(k)},
                          {"max_softmax": np.ones(k)})
    out = runtime.forward(x)
    scores = detector.score(out.logits, None)
    older = D.Detector(detector.kind, detector.layer, float(np.median(scores)), 0.05, detector.center, detector.scale)
    per_class = D.Detector(detector.kind, detector.layer, 1.0, 0.05, detector.center, detector.scale,
                           class_thresholds=np.where(np.arange(k) == first, 0.0, 1.0))
    for version, det in ((1, older), (2, per_class)):
        entry = D.to_manifest(det, {})
        assert ("class_thresholds" in entry) == (version == 2)
        write_detector(repo / "small" / str(version), det, entry)
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        served = {v: client.explain(list(x), "small", version=v).explanations for v in (1, 2)}
    for v in (1, 2):
        assert np.allclose([e.trace.adversarial_score for e in served[v]], scores, atol=1e-5)
    assert [e.trace.adversarial for e in served[1]] == [bool(s > older.threshold) for s in scores]
    want = [bool(c == first) for c in out.logits.argmax(axis=1)]
    assert [e.trace.adversarial for e in served[2]] == want and want[0] and not all(want)


def test_the_served_plausibility_reads_the_manifest_calibration_of_the_explained_class(bundle_dir, tmp_path):
    """Version 2's calibration puts every clean reference of the first image's class at raw 0 (any trace is at least
    as plausible: 1) and every other class's above 1 (no trace reaches them: 0); version 1 has none and serves the
    raw plausibility, with no field when no unit qualifies."""
    repo = make_repo(tmp_path / "repo", bundle_dir, versions=(1, 2))
    _, x, first = _two_class_images(repo)
    quantiles = np.where((np.arange(len(CLASSES)) == first)[:, None], 0.0, 2.0) * np.ones((1, PL.GRID))
    write_plausibility(repo / "small" / "2", PL.to_manifest(quantiles, [100] * len(CLASSES), CLASSES, "test"))
    assert load_bundle(repo / "small" / "2").manifest.plausibility_calibration["data"] == "test"
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        raw, calibrated = (client.explain(list(x), "small", version=v, top_k_units=128).explanations for v in (1, 2))
        deep = client.explain(list(x[:2]), "small", version=2, layers=["layer2", "layer3"]).explanations  # per image
    want = [1.0 if e.prediction.classes[0].index == first else 0.0 for e in calibrated]
    assert [e.trace.plausibility for e in calibrated] == want and 0.0 in want and 1.0 in want
    assert [e.trace.plausibility for e in deep] == want[:2] == [1.0, 0.0]
    assert all(e.trace.HasField("plausibility") for e in calibrated)
    assert any(0 < e.trace.plausibility < 1 for e in raw if e.trace.HasField("plausibility"))  # raw: a co-occurrence


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
@pytest.mark.parametrize("kind", ["mahalanobis", "mahalanobis+max_softmax"])
def test_a_calibrated_bundle_serves_its_detector_score_and_flag(bundle_dir, tmp_path, kind):
    root = tmp_path / "repo" / "small" / "1"
    shutil.copytree(bundle_dir, root)
    before = {f: (root / f).read_bytes() for f in ("model.onnx", "weights.safetensors")}
    runtime = ModelRuntime(load_bundle(root, verify_onnx=False), device="cpu")
    fit = _images(64, 1)
    detector, report = fit_detector(runtime, kind=kind, layer="layer3", fit_images=fit,
                                    fit_labels=np.arange(64) % len(CLASSES), calib_images=_images(60, 2), fpr=0.1)
    write_detector(root, detector, {"kind": detector.kind, "layer": detector.layer, "threshold": detector.threshold,
                                    "target_fpr": detector.target_fpr,
                                    "center": {k: list(v) for k, v in detector.center.items()},
                                    "scale": {k: list(v) for k, v in detector.scale.items()},
                                    "file": "detector.safetensors", "calibration": report})
    assert all((root / f).read_bytes() == data for f, data in before.items())  # other files (and hashes) untouched
    reloaded = load_bundle(root)  # hashes, schema and the ONNX check all still pass
    assert reloaded.manifest.adversarial_detector["kind"] == kind
    x = _images(4, 3)
    out = runtime.forward(x)
    want = detector.score(out.logits, out.activations["layer3"].mean(axis=(2, 3)))
    with BackgroundServer(config(tmp_path / "repo")) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        last = client.explain(list(x), "small").explanations
        hidden = client.explain(list(x[:1]), "small", layers=["layer2"]).explanations[0]  # detector layer not traced
    got = np.array([e.trace.adversarial_score for e in last])
    assert np.allclose(got, want, atol=1e-5) and np.all((got > 0) & (got < 1))
    assert [e.trace.adversarial for e in last] == detector.flags(want, out.logits.argmax(axis=1)).tolist()
    assert hidden.trace.adversarial_score == pytest.approx(float(want[0]), abs=1e-5)
