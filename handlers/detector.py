"""Adversarial-input detection behind the trace's `adversarial_score` (docs/design.md §5, adversarial flag).

Raw scores, higher = more suspicious, each computed from what the one ONNX forward pass already gives:

- ``mahalanobis``: Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
  and Adversarial Attacks", NeurIPS 2018: min over classes c of (f − μ_c)ᵀ Σ⁻¹ (f − μ_c), f the pooled (GAP)
  activations of one traced layer, μ_c the class means and Σ one covariance tied across classes, fitted on
  training images (their `sample_estimator`). Left out: the paper's input preprocessing (one gradient step per
  image, which Predict and Explain cannot afford) and its feature ensemble (a regressor fitted on adversarial
  examples: the served score must not be tuned to one attack).
- ``max_softmax``: 1 − the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017), the baseline.
- ``plausibility``: 1 − the trace plausibility of the explained class (`handlers/trace.py`).

Each raw score is standardised, z = (raw − median) / scale, with the median and the interquartile range / 1.349
of held-out clean images: per predicted class for the Mahalanobis and plausibility parts (a class whose clean
images simply score higher is then not flagged more often), pooled over classes for max-softmax (its clean
spread is a few thousandths, too small to estimate per class; the arrays are stored per class all the same).
A combined detector averages the z of its parts with weights written into its kind: "mahalanobis+max_softmax"
(equal) or "mahalanobis*0.7+max_softmax*0.3". `adversarial_score` = logistic(z) in (0, 1).

The flag is score > the threshold of the predicted class: `class_thresholds[c]`, the (1 − fpr) quantile of the
scores of held-out clean images predicted as c, so every class is flagged at the target rate (median and spread
alone do not line up the classes' upper tails, and max-softmax is pooled). A class with too few calibration
images, and every class of a manifest written before per-class thresholds, uses the global `threshold`, the
(1 − fpr) quantile over all classes. Both are calibrated per model (`training/calibrate.py`) and stored in the
manifest.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError

COMPONENTS = ("mahalanobis", "max_softmax", "plausibility")
PER_CLASS = frozenset({"mahalanobis", "plausibility"})  # standardised per predicted class; the others pooled
DETECTOR_FILE = "detector.safetensors"
MIN_CLASS_IMAGES = 5  # fewer held-out images predicted as a class: that class uses the pooled median and scale
MIN_THRESHOLD_FLAGS = 10  # a class gets its own threshold when its calibration images hold >= this many flags


@dataclass(frozen=True)
class Detector:
    """A fitted and calibrated detector. `kind` names its components joined by "+"; `layer` is the traced layer
    whose pooled activations the Mahalanobis part reads; `center`/`scale` are per class (K,) per component."""

    kind: str
    layer: str
    threshold: float
    target_fpr: float
    center: Mapping[str, np.ndarray]
    scale: Mapping[str, np.ndarray]
    means: np.ndarray | None = None  # (K, C) class means of the pooled layer
    precision: np.ndarray | None = None  # (C, C) inverse of the tied covariance
    class_thresholds: np.ndarray | None = None  # (K,) per predicted class; None: `threshold` for every class

    @property
    def components(self) -> list[str]:
        return list(parse_kind(self.kind))

    @property
    def weights(self) -> dict[str, float]:
        return parse_kind(self.kind)

    @property
    def needs_plausibility(self) -> bool:
        return "plausibility" in self.components

    def raw(self, logits: np.ndarray, pooled: np.ndarray | None,
            plausibility: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each component's raw score for a batch: logits (n, K), pooled (n, C) of `layer`, plausibility (n,)."""
        return raw_scores(self.components, logits, pooled, plausibility, self.means, self.precision)

    def standardized(self, logits: np.ndarray, pooled: np.ndarray | None,
                     plausibility: np.ndarray | None = None) -> np.ndarray:
        """The mean over components of the per-class z of each raw score (classes = the predicted ones)."""
        predicted = np.asarray(logits).argmax(axis=1)
        raws = self.raw(logits, pooled, plausibility)
        weights = self.weights
        z = [weights[c] * (raws[c] - self.center[c][predicted]) / self.scale[c][predicted] for c in weights]
        return np.sum(z, axis=0)

    def score(self, logits: np.ndarray, pooled: np.ndarray | None,
              plausibility: np.ndarray | None = None) -> np.ndarray:
        """adversarial_score in (0, 1) for a batch; higher = more likely adversarial."""
        return logistic(self.standardized(logits, pooled, plausibility))

    def thresholds(self, predicted: np.ndarray) -> np.ndarray:
        """The threshold each image is flagged above: its predicted class's, else the global one."""
        predicted = np.asarray(predicted, dtype=np.intp)
        if self.class_thresholds is None:
            return np.full(predicted.shape, self.threshold, dtype=np.float64)
        return np.asarray(self.class_thresholds, dtype=np.float64)[predicted]

    def flags(self, scores: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """score > the threshold of each image's predicted class (logits.argmax, as `standardized` uses)."""
        return np.asarray(scores) > self.thresholds(predicted)


def parse_kind(kind: str) -> dict[str, float]:
    """Component -> weight (summing to 1) from "a+b" (equal weights) or "a*0.7+b*0.3"; ValueError when malformed."""
    parts: dict[str, float] = {}
    for item in str(kind).split("+"):
        name, _, weight = item.partition("*")
        name = name.strip()
        if name not in COMPONENTS or name in parts:
            raise ValueError(f"expected components from {', '.join(COMPONENTS)} joined by '+', got {kind!r}")
        try:
            parts[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} in detector kind {kind!r}") from None
        if not math.isfinite(parts[name]) or parts[name] <= 0:
            raise ValueError(f"weights must be positive, got {weight!r} in {kind!r}")
    total = sum(parts.values())
    return {name: w / total for name, w in parts.items()}


def logistic(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -50, 50)))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, C) and the precision (C, C) of the covariance tied across classes (Lee et al.'s
    `sample_estimator`: the empirical covariance of the class-centred features, inverted by pseudo-inverse)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    missing = [c for c in range(n_classes) if not np.any(y == c)]
    if missing:
        raise ValueError(f"no fitting images for classes {missing}")
    means = np.stack([f[y == c].mean(axis=0) for c in range(n_classes)])
    centred = f - means[y]
    cov = centred.T @ centred / len(f)
    return means.astype(np.float32), np.linalg.pinv(cov, hermitian=True).astype(np.float32)


def mahalanobis(pooled: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min over classes c of the squared Mahalanobis distance (f − μ_c)ᵀ P (f − μ_c), per row of `pooled`."""
    f = np.asarray(pooled, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    # (f − μ)ᵀP(f − μ) = fᵀPf − 2 fᵀPμ + μᵀPμ for all classes at once
    fp = f @ p
    d = (fp * f).sum(axis=1, keepdims=True) - 2 * fp @ mu.T + ((mu @ p) * mu).sum(axis=1)[None, :]
    return d.min(axis=1)


def raw_scores(components: Sequence[str], logits: np.ndarray, pooled: np.ndarray | None,
               plausibility: np.ndarray | None, means: np.ndarray | None,
               precision: np.ndarray | None) -> dict[str, np.ndarray]:
    """Raw scores (higher = more suspicious) of the named components; see the module docstring."""
    out: dict[str, np.ndarray] = {}
    for name in components:
        if name == "max_softmax":
            out[name] = 1.0 - softmax(logits).max(axis=1)
        elif name == "mahalanobis":
            if pooled is None or means is None or precision is None:
                raise ValueError("the mahalanobis score needs the layer's pooled activations and a fitted detector")
            out[name] = mahalanobis(pooled, means, precision)
        elif name == "plausibility":
            if plausibility is None:
                raise ValueError("the plausibility score needs each image's trace plausibility")
            # no qualifying unit (None upstream, NaN here) vouches for nothing: as implausible as it gets
            out[name] = 1.0 - np.nan_to_num(np.asarray(plausibility, dtype=np.float64), nan=0.0)
        else:
            raise ValueError(f"unknown detector component {name!r}; valid: {', '.join(COMPONENTS)}")
    return out


def class_standardizer(raw: np.ndarray, predicted: np.ndarray, n_classes: int,
                       per_class: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (median, IQR / 1.349) of clean raw scores; classes with fewer than MIN_CLASS_IMAGES images (and
    every class when not `per_class`) take the pooled values, and a zero spread becomes the pooled spread (or a
    tiny positive one)."""
    raw = np.asarray(raw, dtype=np.float64)
    predicted = np.asarray(predicted)
    pooled_center = float(np.median(raw))
    pooled_scale = _spread(raw) or float(np.std(raw)) or 1e-6
    center = np.full(n_classes, pooled_center)
    scale = np.full(n_classes, pooled_scale)
    for c in range(n_classes if per_class else 0):
        values = raw[predicted == c]
        if len(values) >= MIN_CLASS_IMAGES:
            center[c] = np.median(values)
            scale[c] = _spread(values) or pooled_scale
    return center, scale


def _spread(values: np.ndarray) -> float:
    q75, q25 = np.percentile(values, [75, 25])
    return float(q75 - q25) / 1.349


def calibrate_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The threshold t with score > t flagging at most a fraction `fpr` of `clean_scores` (their (1 − fpr)
    quantile, taken as an observed value so ties cannot push the rate above fpr)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs at least one clean score")
    index = min(scores.size - 1, math.ceil((1 - fpr) * scores.size) - 1)
    return float(scores[max(index, 0)])


def calibrate_class_thresholds(clean_scores: np.ndarray, predicted: np.ndarray, n_classes: int,
                               fpr: float) -> tuple[float, np.ndarray]:
    """(global threshold, per-class thresholds (K,)) from held-out clean scores and their predicted classes: each
    class with at least MIN_THRESHOLD_FLAGS / fpr images gets `calibrate_threshold` of its own scores (fewer
    images cannot place a 5% tail), the others the global one."""
    scores = np.asarray(clean_scores, dtype=np.float64)
    predicted = np.asarray(predicted)
    overall = calibrate_threshold(scores, fpr)
    per_class = np.full(n_classes, overall)
    for c in range(n_classes):
        values = scores[predicted == c]
        if len(values) * fpr >= MIN_THRESHOLD_FLAGS:
            per_class[c] = calibrate_threshold(values, fpr)
    return overall, per_class


# --- the manifest entry and its file -------------------------------------------------------------------------


def to_manifest(detector: Detector, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `adversarial_detector` object (JSON-safe); the arrays go to DETECTOR_FILE."""
    return {
        "kind": detector.kind, "layer": detector.layer, "threshold": float(detector.threshold),
        "target_fpr": float(detector.target_fpr),
        "center": {c: [float(v) for v in detector.center[c]] for c in detector.components},
        "scale": {c: [float(v) for v in detector.scale[c]] for c in detector.components},
        "file": DETECTOR_FILE if detector.means is not None else "",
        "calibration": dict(calibration),
        **({} if detector.class_thresholds is None else
           {"class_thresholds": [float(v) for v in detector.class_thresholds]}),
    }


def save_arrays(detector: Detector, path: Path) -> None:
    from safetensors.numpy import save_file

    if detector.means is None or detector.precision is None:
        raise ValueError("only a detector with a Mahalanobis part has arrays to save")
    save_file({"means": np.ascontiguousarray(detector.means, dtype=np.float32),
               "precision": np.ascontiguousarray(detector.precision, dtype=np.float32)}, str(path))


def parse_entry(raw: Any, classes: int, layers: Sequence[str], files: Mapping[str, str]) -> dict[str, Any]:
    """Validate the manifest's `adversarial_detector` object; raises BundleError naming the field."""
    where = "adversarial_detector"

    def bad(field: str, problem: str) -> BundleError:
        return BundleError(f"manifest field {where + field!r}: {problem}")

    if not isinstance(raw, dict):
        raise bad("", "expected an object")
    for key in ("kind", "layer", "threshold", "target_fpr", "center", "scale", "file"):
        if key not in raw:
            raise bad(f".{key}", "missing")
    kind = raw["kind"]
    try:
        parts = list(parse_kind(kind))
    except ValueError as err:
        raise bad(".kind", str(err)) from None
    if raw["layer"] not in layers:
        raise bad(".layer", f"not a traced layer: {raw['layer']!r}")
    for key in ("threshold", "target_fpr"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(f".{key}", f"expected a finite number, got {value!r}")
    if not 0 < raw["target_fpr"] < 1:
        raise bad(".target_fpr", f"must lie in (0, 1), got {raw['target_fpr']}")
    for key in ("center", "scale"):
        table = raw[key]
        if not isinstance(table, dict) or set(table) != set(parts):
            raise bad(f".{key}", f"expected one list per component {parts}")
        for part, values in table.items():
            ok = isinstance(values, list) and len(values) == classes and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if not ok or (key == "scale" and min(values) <= 0):
                raise bad(f".{key}.{part}", f"expected {classes} finite numbers" + (" > 0" if key == "scale" else ""))
    file = raw["file"]
    if "mahalanobis" in parts and (not isinstance(file, str) or file not in files):
        raise bad(".file", f"the mahalanobis part needs its arrays in a file listed under 'files', got {file!r}")
    if "class_thresholds" in raw:  # optional: manifests written before per-class thresholds use `threshold` alone
        values = raw["class_thresholds"]
        ok = isinstance(values, list) and len(values) == classes and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok:
            raise bad(".class_thresholds", f"expected {classes} finite numbers, one per class")
    return dict(raw)


def load_detector(root: Path, entry: Mapping[str, Any]) -> Detector:
    """The Detector of a bundle at `root` from its validated manifest entry (arrays read from its file)."""
    means = precision = None
    if "mahalanobis" in parse_kind(entry["kind"]):
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(Path(root) / entry["file"]))
            means, precision = arrays["means"], arrays["precision"]
        except Exception as err:  # safetensors raises its own errors without a common base
            raise BundleError(f"{root}: {entry['file']} does not load: {err}") from err
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise BundleError(f"{root}: {entry['file']}: means {means.shape} and precision {precision.shape} "
                              "do not fit together")
    return Detector(kind=entry["kind"], layer=entry["layer"], threshold=float(entry["threshold"]),
                    target_fpr=float(entry["target_fpr"]),
                    center={k: np.asarray(v, dtype=np.float64) for k, v in entry["center"].items()},
                    scale={k: np.asarray(v, dtype=np.float64) for k, v in entry["scale"].items()},
                    means=means, precision=precision,
                    class_thresholds=None if entry.get("class_thresholds") is None else
                    np.asarray(entry["class_thresholds"], dtype=np.float64))


_DETECTORS: weakref.WeakKeyDictionary[Any, Detector | None] = weakref.WeakKeyDictionary()


def detector_for(runtime: Any) -> Detector | None:
    """The runtime's detector (None for bundles without one), loaded once per model version."""
    if runtime not in _DETECTORS:
        entry = getattr(runtime.manifest, "adversarial_detector", None)
        _DETECTORS[runtime] = None if not entry else load_detector(runtime.bundle.root, entry)
    return _DETECTORS[runtime]
