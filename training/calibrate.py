"""Fit and calibrate a bundle's adversarial detector (handlers/detector.py) and store it in the bundle.

`calibrate_bundle(dir)` works on any bundle directory: export calls it on the bundle it is about to publish, and
`conceptlens calibrate --bundle models/shapes/1` adds it to an existing bundle without retraining. Steps, all
through the served code path (ONNX Runtime forward, the trace's plausibility):

1. Mahalanobis part: class means and tied covariance of the layer's pooled activations on the *fit* images
   (the model's training data, by their true labels).
2. Standardisation: median and spread of each raw score over the even-numbered *calibration* images (held-out
   clean images, never trained on), by predicted class where the detector says so (`detector.PER_CLASS`).
3. Thresholds: the (1 − fpr) quantile of the adversarial_score of the odd-numbered calibration images, per
   predicted class (`class_thresholds`) and over all of them (`threshold`, kept for older readers and for
   classes with too few images), so the flag fires on a fraction fpr of each class's clean images (default 5%).
   Placing a 5% tail per class takes a few hundred images per class: the default calibration set has 6000
   (about 333 per class in each half).

Before the detector, the trace's plausibility is calibrated per class (`handlers/plausibility.py`): the quantiles of
the raw plausibility of all calibration images, by the class each is explained as, go into the manifest's
`plausibility_calibration` entry, so the served plausibility (and a detector part that reads it) is the calibrated
one. Bundles whose manifest has no co-occurrence table, or whose traced layer does not feed a linear head, skip it.

The bundle gains `detector.safetensors` (listed with its sha256 under `files`) and the manifest's
`adversarial_detector` entry; the manifest is replaced atomically and the bundle reloaded to check it. The other
files are untouched, so their hashes stay valid.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.handlers import bundle as B
from conceptlens.handlers import detector as D
from conceptlens.handlers import plausibility as PL
from conceptlens.handlers.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_KIND = "mahalanobis*0.7+max_softmax*0.3"  # the best of `conceptlens experiment detectors` on models/shapes/1
DEFAULT_FPR = 0.05
DEFAULT_CALIBRATION = "shapes:6000:1000"  # val split: ShapesWorld seed 3001, never a training or dissection seed


def served_outputs(runtime: Any, images: np.ndarray, layer: str, *, batch_size: int = 256,
                   plausibility: bool = False,
                   raw: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(logits (n, K), pooled activations of `layer` (n, C), plausibility of the predicted class (n,) or None),
    from the ONNX forward pass and the exact last-layer trace, as the server computes them (`raw`: the
    plausibility before the per-class calibration)."""
    from conceptlens.handlers.trace import TraceOptions, trace_last_layer

    logits, pooled, plaus = [], [], []
    head = runtime.head
    for start in range(0, len(images), batch_size):
        out = runtime.forward(images[start : start + batch_size])
        logits.append(out.logits)
        means = out.activations[layer].mean(axis=(2, 3))
        pooled.append(means)
        if plausibility:
            if head is None:
                raise InvalidInput("kind", "the plausibility part needs a model whose traced layer feeds its head")
            head_means = means if head.layer == layer else out.activations[head.layer].mean(axis=(2, 3))
            traces = trace_last_layer(runtime, out.logits, out.activations[head.layer], head_means,
                                      TraceOptions(layers=[head.layer]))
            values = [t.raw_plausibility if raw else t.plausibility for t in traces]
            plaus.append(np.array([np.nan if v is None else v for v in values]))
    return (np.concatenate(logits), np.concatenate(pooled), np.concatenate(plaus) if plausibility else None)


def dataset_images(spec: str, split: str, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n,3,size,size) float32 in [0,1], labels (n,)) of a dataset spec (`open_dataset`)."""
    from conceptlens.training.data.registry import open_dataset

    ds = open_dataset(spec, split, size)
    n = len(ds) if limit is None else min(limit, len(ds))
    images, labels = zip(*(ds[i][:2] for i in range(n)), strict=True)
    return np.stack([np.asarray(x, dtype=np.float32) for x in images]), np.asarray(labels, dtype=np.int64)


def fit_detector(runtime: Any, *, kind: str, layer: str, fit_images: np.ndarray, fit_labels: np.ndarray,
                 calib_images: np.ndarray, fpr: float) -> tuple[D.Detector, dict[str, Any]]:
    """The calibrated Detector and a JSON report (images used, clean flag rate on the threshold half overall and
    per predicted class, with the number of images behind each class's threshold)."""
    try:
        parts = list(D.parse_kind(kind))
    except ValueError as err:
        raise InvalidInput("kind", f"components must come from {', '.join(D.COMPONENTS)}: {err}") from None
    if layer not in runtime.layers:
        raise InvalidInput("layer", f"not a traced layer of the bundle: {layer!r} (have {runtime.layer_order})")
    if not 0 < fpr < 1:
        raise InvalidInput("fpr", f"must lie in (0, 1), got {fpr}")
    if len(calib_images) < 20:
        raise InvalidInput("calibration", f"need at least 20 held-out images, got {len(calib_images)}")
    n_classes = len(runtime.classes)
    means = precision = None
    if "mahalanobis" in parts:
        _, fit_pooled, _ = served_outputs(runtime, fit_images, layer)
        means, precision = D.fit_mahalanobis(fit_pooled, fit_labels, n_classes)
    logits, pooled, plaus = served_outputs(runtime, calib_images, layer, plausibility="plausibility" in parts)
    raws = D.raw_scores(parts, logits, pooled, plaus, means, precision)
    predicted = logits.argmax(axis=1)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    center, scale = {}, {}
    for part in parts:
        center[part], scale[part] = D.class_standardizer(raws[part][even], predicted[even], n_classes,
                                                         per_class=part in D.PER_CLASS)
    detector = D.Detector(kind, layer, 0.0, fpr, center, scale, means, precision)
    scores = detector.score(logits[odd], pooled[odd], None if plaus is None else plaus[odd])
    threshold, class_thresholds = D.calibrate_class_thresholds(scores, predicted[odd], n_classes, fpr)
    detector = D.Detector(kind, layer, threshold, fpr, center, scale, means, precision, class_thresholds)
    flags = detector.flags(scores, predicted[odd])
    names = list(runtime.classes)
    report = {"fit_images": len(fit_images), "standardize_images": len(logits[even]),
              "threshold_images": len(scores), "clean_flag_rate": float(flags.mean()),
              "class_threshold_images": {c: int((predicted[odd] == i).sum()) for i, c in enumerate(names)},
              "class_clean_flag_rate": {c: float(flags[predicted[odd] == i].mean()) if np.any(predicted[odd] == i)
                                        else None for i, c in enumerate(names)}}
    return detector, report


def calibrate_bundle(bundle_dir: str | Path, *, kind: str = DEFAULT_KIND, layer: str | None = None,
                     fpr: float = DEFAULT_FPR, fit: str | None = None, calibration: str = DEFAULT_CALIBRATION,
                     fit_limit: int | None = None) -> dict[str, Any]:
    """Fit, calibrate and store the detector of the bundle at `bundle_dir` (see the module docstring). `fit`
    defaults to the training data named in the bundle's provenance; `layer` to the layer feeding the linear
    head (else the deepest traced layer). Returns the manifest's new `adversarial_detector` entry."""
    from conceptlens.handlers.backends import ModelRuntime

    root = Path(bundle_dir)
    bundle = B.load_bundle(root, verify_onnx=False)
    runtime = ModelRuntime(bundle, device="cpu")
    layer = layer or (runtime.head.layer if runtime.head is not None else runtime.layer_order[-1])
    fit = fit or _training_data(bundle.manifest)
    size = bundle.manifest.input.size
    fit_images, fit_labels = dataset_images(fit, "train", size, fit_limit)
    calib_images, _ = dataset_images(calibration, "val", size)
    if bundle.manifest.cooccurrence and runtime.head is not None:
        write_plausibility(root, calibrate_plausibility(runtime, calib_images, f"{calibration} (val split)"))
        runtime = ModelRuntime(B.load_bundle(root, verify_onnx=False), device="cpu")  # serves it from now on
    else:
        log.info("%s: no co-occurrence table or no linear head: the raw plausibility stays served", root)
    detector, report = fit_detector(runtime, kind=kind, layer=layer, fit_images=fit_images, fit_labels=fit_labels,
                                    calib_images=calib_images, fpr=fpr)
    entry = D.to_manifest(detector, {**report, "fit": f"{fit} (train split)",
                                     "calibration": f"{calibration} (val split)"})
    write_detector(root, detector, entry)
    return entry


def calibrate_plausibility(runtime: Any, images: np.ndarray, source: str) -> dict[str, Any]:
    """The manifest's `plausibility_calibration` entry from held-out clean images (their raw plausibility, by
    predicted class; see handlers/plausibility.py)."""
    logits, _, raw = served_outputs(runtime, images, runtime.head.layer, plausibility=True, raw=True)
    quantiles, counts = PL.fit_reference(raw, logits.argmax(axis=1), len(runtime.classes))
    return PL.to_manifest(quantiles, counts, runtime.classes, source)


def write_plausibility(root: Path, entry: dict[str, Any]) -> None:
    """Set the manifest's `plausibility_calibration` entry of the bundle at `root` (atomically) and re-check."""
    data = json.loads((root / B.MANIFEST).read_text())
    data[PL.ENTRY] = entry
    _write_manifest(root, data)


def write_detector(root: Path, detector: D.Detector, entry: dict[str, Any]) -> None:
    """Add the detector's file and manifest entry to the bundle at `root`, atomically per file, and re-check."""
    data = json.loads((root / B.MANIFEST).read_text())
    files = dict(data["files"])
    if detector.means is not None:
        tmp = root / f".{D.DETECTOR_FILE}.tmp"
        D.save_arrays(detector, tmp)
        tmp.chmod(0o644)
        os.replace(tmp, root / D.DETECTOR_FILE)
        files[D.DETECTOR_FILE] = B.sha256_file(root / D.DETECTOR_FILE)
    data["files"] = files
    data["adversarial_detector"] = entry
    _write_manifest(root, data)
    log.info("%s: %s detector on %s, threshold %.4f for a %.0f%% clean flag rate", root, detector.kind,
             detector.layer, detector.threshold, 100 * detector.target_fpr)


def _write_manifest(root: Path, data: dict[str, Any]) -> None:
    B.Manifest.from_json(data)  # never write a manifest the loader would refuse
    fd, name = tempfile.mkstemp(prefix=".manifest.", dir=root)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
    os.chmod(name, 0o644)
    os.replace(name, root / B.MANIFEST)
    B.load_bundle(root, verify_onnx=False)


def _training_data(manifest: B.Manifest) -> str:
    config = manifest.provenance.get("config") or {}
    spec = (config.get("data") or {}).get("train") if isinstance(config, dict) else None
    if not isinstance(spec, str) or not spec:
        raise InvalidInput("fit", "the bundle's provenance names no training data; pass the fit dataset")
    return spec
