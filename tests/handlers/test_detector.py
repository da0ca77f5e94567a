"""The adversarial detector's parts on data whose answer is known: Lee et al.'s class means and tied covariance,
per-class standardisation, the calibrated global and per-class thresholds' false-positive rates on held-out data,
the manifest entry's validation (with and without per-class thresholds), and plausibility counting only units
present in the input."""

from __future__ import annotations

import types

import numpy as np
import pytest

from conceptlens.handlers import detector as D
from conceptlens.handlers.errors import BundleError
from conceptlens.handlers.trace import UnitTrace, plausibility


def _gaussian_classes(rng, n_per_class: int, means: np.ndarray, cov: np.ndarray):
    chol = np.linalg.cholesky(cov)
    x = np.concatenate([m + rng.standard_normal((n_per_class, len(m))) @ chol.T for m in means])
    return x, np.repeat(np.arange(len(means)), n_per_class)


def test_mahalanobis_fit_recovers_class_means_and_the_tied_precision():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, -3.0, 2.0]])
    cov = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    x, y = _gaussian_classes(rng, 4000, means, cov)
    mu, precision = D.fit_mahalanobis(x, y, 3)
    assert np.allclose(mu, means, atol=0.08)
    assert np.allclose(precision, np.linalg.inv(cov), atol=0.1)
    probe = np.array([[1.0, 1.0, 1.0], [4.0, 0.0, 1.0]])
    explicit = [min(float((p - m) @ precision @ (p - m)) for m in mu) for p in probe]
    assert np.allclose(D.mahalanobis(probe, mu, precision), explicit, rtol=1e-5)
    assert D.mahalanobis(probe[1:], mu, precision)[0] < 0.05  # sits on a class mean


def test_calibrated_threshold_gives_its_false_positive_rate_on_held_out_data():
    rng = np.random.default_rng(1)
    for fpr in (0.01, 0.05, 0.2):
        threshold = D.calibrate_threshold(rng.gamma(2.0, 1.0, 5000), fpr)
        held_out = rng.gamma(2.0, 1.0, 200_000)
        assert (held_out > threshold).mean() == pytest.approx(fpr, abs=0.01)
    assert (np.arange(100.0) > D.calibrate_threshold(np.arange(100.0), 0.05)).sum() == 5  # exactly, on itself
    with pytest.raises(ValueError):
        D.calibrate_threshold(np.ones(3), 0.0)


def test_per_class_standardisation_evens_out_the_flag_rate_across_classes():
    """Class 1's clean scores run 10x higher than class 0's: one raw threshold would flag mostly class 1; the
    standardised detector flags each class at the target rate on held-out data."""
    rng = np.random.default_rng(2)

    def clean(n):
        predicted = rng.integers(0, 2, n)
        raw = np.where(predicted == 0, rng.gamma(3.0, 1.0, n), 10 * rng.gamma(3.0, 1.0, n))
        logits = np.stack([predicted == 0, predicted == 1], axis=1).astype(float) * 5
        return logits, raw, predicted

    logits, raw, predicted = clean(4000)
    center, scale = D.class_standardizer(raw, predicted, 2)
    det = D.Detector("plausibility", "layer3", 0.0, 0.05, {"plausibility": center}, {"plausibility": scale})
    # the plausibility component reads 1 - plausibility: feed plausibility = 1 - raw to score `raw`
    threshold = D.calibrate_threshold(det.score(logits, None, 1 - raw), 0.05)
    det = D.Detector("plausibility", "layer3", threshold, 0.05, det.center, det.scale)
    logits, raw, predicted = clean(40_000)
    flags = det.flags(det.score(logits, None, 1 - raw), predicted)
    for c in (0, 1):
        assert flags[predicted == c].mean() == pytest.approx(0.05, abs=0.012)
    raw_threshold = D.calibrate_threshold(raw, 0.05)
    assert (raw[predicted == 0] > raw_threshold).mean() < 0.01  # what standardising fixes


def test_per_class_thresholds_give_every_class_its_false_positive_rate_on_held_out_data():
    """Three classes with the same clean median and interquartile range but different upper tails (two normal, one
    Cauchy): standardising cannot line them up, one global threshold flags the heavy-tailed class about twice as
    often as the target and the others half as often, per-class thresholds flag each class at its target."""
    rng = np.random.default_rng(3)

    def clean(n):
        predicted = rng.integers(0, 3, n)
        raw = np.where(predicted == 2, rng.standard_cauchy(n) / 2, rng.standard_normal(n) / 1.349)  # IQR 1 each
        return np.eye(3)[predicted] * 5, raw, predicted

    fpr = 0.05
    logits, raw, predicted = clean(9000)
    center, scale = D.class_standardizer(raw, predicted, 3)
    det = D.Detector("plausibility", "layer3", 0.0, fpr, {"plausibility": center}, {"plausibility": scale})
    scores = det.score(logits, None, 1 - raw)
    threshold, per_class = D.calibrate_class_thresholds(scores, predicted, 3, fpr)
    held_logits, held_raw, held_predicted = clean(90_000)
    held = det.score(held_logits, None, 1 - held_raw)
    global_only = D.Detector("plausibility", "layer3", threshold, fpr, det.center, det.scale)
    per_class_det = D.Detector("plausibility", "layer3", threshold, fpr, det.center, det.scale,
                               class_thresholds=per_class)
    assert global_only.flags(held, held_predicted)[held_predicted == 2].mean() > 1.6 * fpr  # what one global does
    flags = per_class_det.flags(held, held_predicted)
    for c in range(3):
        assert flags[held_predicted == c].mean() == pytest.approx(fpr, abs=0.012)
    # a class too rare to place its tail (fewer than MIN_THRESHOLD_FLAGS / fpr images) takes the global threshold
    rare = np.where(predicted == 2)[0][: int(D.MIN_THRESHOLD_FLAGS / fpr) - 1]
    keep = np.concatenate([np.where(predicted != 2)[0], rare])
    overall, sparse = D.calibrate_class_thresholds(scores[keep], predicted[keep], 3, fpr)
    assert sparse[2] == overall and sparse[0] != overall


def test_scores_lie_in_the_unit_interval_and_rise_with_the_raw_score():
    z = np.array([-100.0, -1.0, 0.0, 1.0, 100.0])
    s = D.logistic(z)
    assert np.all((s >= 0) & (s <= 1)) and np.all(np.diff(s) > 0) and s[2] == 0.5


def _entry(**changes):
    entry = {"kind": "mahalanobis", "layer": "layer3", "threshold": 0.8, "target_fpr": 0.05,
             "center": {"mahalanobis": [1.0, 2.0]}, "scale": {"mahalanobis": [1.0, 1.0]},
             "file": D.DETECTOR_FILE, "calibration": {}}
    entry.update(changes)
    return entry


@pytest.mark.parametrize("changes, field", [
    ({"kind": "lid"}, "kind"), ({"layer": "layer9"}, "layer"), ({"threshold": "high"}, "threshold"),
    ({"target_fpr": 1.5}, "target_fpr"), ({"scale": {"mahalanobis": [1.0, 0.0]}}, "scale.mahalanobis"),
    ({"center": {"mahalanobis": [1.0]}}, "center.mahalanobis"), ({"file": "other.bin"}, "file"),
    ({"class_thresholds": [0.9]}, "class_thresholds"), ({"class_thresholds": [0.9, "x"]}, "class_thresholds"),
    ({"class_thresholds": 0.9}, "class_thresholds"),
])
def test_a_bad_manifest_entry_is_refused_naming_the_field(changes, field):
    files = {D.DETECTOR_FILE: "0" * 64}
    D.parse_entry(_entry(), 2, ["layer2", "layer3"], files)  # the good one passes, with or without class thresholds
    D.parse_entry(_entry(class_thresholds=[0.9, 0.95]), 2, ["layer2", "layer3"], files)
    with pytest.raises(BundleError, match=f"adversarial_detector.{field}"):
        D.parse_entry(_entry(**changes), 2, ["layer2", "layer3"], files)


def test_without_class_thresholds_every_class_uses_the_global_threshold():
    """An entry written before per-class thresholds flags exactly as it did: score > threshold, whatever the class."""
    det = D.Detector("max_softmax", "layer3", 0.6, 0.05, {"max_softmax": np.zeros(2)}, {"max_softmax": np.ones(2)})
    scores, predicted = np.array([0.55, 0.65, 0.55, 0.65]), np.array([0, 0, 1, 1])
    assert det.flags(scores, predicted).tolist() == [False, True, False, True]
    per_class = D.Detector("max_softmax", "layer3", 0.6, 0.05, det.center, det.scale,
                           class_thresholds=np.array([0.5, 0.7]))
    assert per_class.flags(scores, predicted).tolist() == [True, True, False, False]


def test_only_units_present_in_the_input_vouch_for_their_concept():
    """A unit that raises the class score by being below its baseline (negative weight, Δ > 0) is absent: its
    concept is not in the image, so it must not make the trace look plausible."""
    runtime = types.SimpleNamespace(manifest=types.SimpleNamespace(cooccurrence={
        "wheel": {"car": 1.0, "boat": 0.0}, "sail": {"car": 0.0, "boat": 1.0}}))

    def unit(k, delta, concept, activation, baseline):
        return UnitTrace("layer3", k, delta, True, activation, baseline, concept, "part", 0.1, True)

    present_sail = unit(1, 1.0, "sail", activation=0.9, baseline=0.2)
    absent_wheel = unit(2, 3.0, "wheel", activation=0.0, baseline=0.4)  # Δ > 0 only because the unit is off
    assert plausibility(runtime, [present_sail, absent_wheel], "car") == pytest.approx(0.0)
    assert plausibility(runtime, [absent_wheel], "car") is None
    assert plausibility(runtime, [present_sail, absent_wheel], "boat") == pytest.approx(1.0)


def test_detector_kinds_carry_their_weights():
    assert D.parse_kind("mahalanobis") == {"mahalanobis": 1.0}
    assert D.parse_kind("mahalanobis+max_softmax") == {"mahalanobis": 0.5, "max_softmax": 0.5}
    assert D.parse_kind("mahalanobis*0.7+max_softmax*0.3") == pytest.approx({"mahalanobis": 0.7, "max_softmax": 0.3})
    for bad in ("lid", "mahalanobis+mahalanobis", "mahalanobis*-1", "mahalanobis*x"):
        with pytest.raises(ValueError):
            D.parse_kind(bad)
    center = {"mahalanobis": np.zeros(2), "max_softmax": np.zeros(2)}
    scale = {"mahalanobis": np.ones(2), "max_softmax": np.ones(2)}
    det = D.Detector("mahalanobis*0.75+max_softmax*0.25", "layer3", 0.5, 0.05, center, scale,
                     means=np.zeros((2, 1), dtype=np.float32), precision=np.ones((1, 1), dtype=np.float32))
    logits = np.array([[0.0, 0.0]])  # max-softmax raw = 0.5
    pooled = np.array([[2.0]])  # squared distance to either mean = 4
    assert det.standardized(logits, pooled)[0] == pytest.approx(0.75 * 4 + 0.25 * 0.5)
