"""`conceptlens export`: turn a training run (and optionally its dissection) into a servable bundle."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from conceptlens.handlers.errors import InvalidInput

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a bundle directory (model.onnx, weights.safetensors, manifest.json) from a training run. "
        "ONNX Runtime and torch outputs are compared before the bundle is published. Place it at "
        "<models>/<name>/<version> for `conceptlens serve --models <models>`."
    )
    parser.add_argument("--run", required=True, type=Path, help="training run directory (holds run.json)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write, e.g. models/shapes/1")
    parser.add_argument("--name", help="model name in the manifest (default: the --out parent's name)")
    parser.add_argument("--version", type=int, help="model version >= 1 (default: --out's name if numeric, else 1)")
    parser.add_argument("--dissection", type=Path, help="report directory of `conceptlens dissect` (unit labels)")
    parser.add_argument("--layers", help="comma-separated layers to trace (default: dissected or default layers)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--detector",
                        help="adversarial detector fitted and calibrated into the bundle (components joined by '+', "
                             "optionally weighted: mahalanobis, max_softmax, plausibility; 'none' leaves it out; "
                             "default mahalanobis*0.7+max_softmax*0.3, the best measured on models/shapes/1, left "
                             "out with a note when the run names no training data and no --fit is given, as for "
                             "an imported run)")
    parser.add_argument("--fpr", type=float, default=0.05,
                        help="clean false-positive rate the detector's threshold is calibrated for (default 0.05)")
    parser.add_argument("--fit", help="dataset spec the detector's class means are fitted on, train split, e.g. "
                                      "imagefolder:PATH (default: the training data named in the run)")
    parser.add_argument("--calibration",
                        help="held-out clean images for the calibration, val split (default shapes:6000:1000)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from conceptlens.handlers.bundle import load_bundle
    from conceptlens.training.export import export_bundle, load_dissection

    run_dir: Path = args.run
    if not (run_dir / "run.json").is_file():
        raise InvalidInput("--run", f"{run_dir} is not a training run (no run.json)")
    name = args.name or args.out.resolve().parent.name
    version = args.version if args.version is not None else (int(args.out.name) if args.out.name.isdigit() else 1)
    if version < 1:
        raise InvalidInput("--version", f"must be >= 1, got {version}")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise InvalidInput("--out", f"{args.out} exists and is not empty (use --overwrite)")
    dissection = load_dissection(args.dissection) if args.dissection else None
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None

    from conceptlens.training.run import load_run, read_run

    model = load_run(run_dir)
    run_info = read_run(run_dir)
    provenance = {
        "run": str(run_dir.resolve()),
        "config": run_info.get("config") or _read_json(run_dir / "config.json"),
        "regime": run_info.get("regime"),
        "lambda": run_info.get("lambda"),
        "epsilon": run_info.get("eps"),
        "attack": run_info.get("attack"),
        "seed": run_info.get("seed"),
        "git_commit_trained": run_info.get("git_commit"),
    }
    metrics = {**_last_metrics(run_dir / "metrics.jsonl"), **(run_info.get("metrics") or {})}
    if layers is None and dissection is None and run_info.get("layers"):
        layers = list(run_info["layers"])
    if not 0 < args.fpr < 1:
        raise InvalidInput("--fpr", f"must lie in (0, 1), got {args.fpr}")
    detector = _detector_request(args, provenance["config"])
    out = export_bundle(
        model, args.out, name=name, version=version, layers=layers, dissection=dissection,
        metrics=metrics, provenance=provenance, overwrite=args.overwrite, detector=detector,
    )
    bundle = load_bundle(out)  # the check the server will make, made now
    result = {"bundle": str(out), "name": name, "version": version, "layers": bundle.layer_names,
              "files": bundle.manifest.files, "onnx_max_abs_error": bundle.manifest.metrics.get("onnx_max_abs_error")}
    print(json.dumps(result, indent=1) if args.json else f"wrote {name} v{version} to {out} (layers: "
          f"{', '.join(bundle.layer_names)})")
    if detector is None and args.detector is None:  # the default detector was skipped: say how to add it later
        print(f"note: no adversarial detector ({run_dir} names no training data to fit it on); add one with "
              f"`conceptlens calibrate --bundle {out} --fit DATA --calibration DATA`", file=sys.stderr)
    return 0


def _detector_request(args: argparse.Namespace, config: Any) -> dict[str, Any] | None:
    """The keyword arguments of `calibrate_bundle` for the detector asked for, or None to leave it out.

    The detector's class means are fitted on the run's training data (or --fit). A run that names none (an
    imported one) gets no detector by default rather than a failed export; asking for one explicitly, or giving
    only --calibration, without fit data is an error naming --fit.
    """
    from conceptlens.training.calibrate import DEFAULT_CALIBRATION, DEFAULT_KIND

    if args.detector == "none":
        return None
    train = (config.get("data") or {}).get("train") if isinstance(config, dict) else None
    fit = args.fit or (train if isinstance(train, str) and train else None)
    if fit is None:
        if args.detector is None and args.calibration is None:
            return None
        raise InvalidInput("--fit", "the run names no training data to fit the adversarial detector on; pass "
                                    "--fit DATA (e.g. imagefolder:PATH) or --detector none")
    return {"kind": args.detector or DEFAULT_KIND, "fpr": args.fpr, "fit": fit,
            "calibration": args.calibration or DEFAULT_CALIBRATION}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _last_metrics(path: Path) -> dict[str, Any]:
    """The run's final evaluation: the last metrics.jsonl record (training logs one JSON object per line)."""
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a bad line in %s", path)
                continue
            if isinstance(record, dict):
                last = record
    return {"training": last} if last else {}
