"""`conceptlens experiment detectors`: compare adversarial detectors on one bundle (AUROC with intervals)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput


def configure(parser: argparse.ArgumentParser) -> None:
    from conceptlens.training.detector_eval import CANDIDATES, EVAL_DATA, FPR_DATA, DetectorEvalConfig

    parser.description = (
        "Attack held-out clean images against the bundle's own model (white-box PGD at each image's minimal "
        "flipping eps within a cap, and PGD until the wrong class has probability >= 0.9), then compare "
        "detectors on clean vs adversarial: raw max-softmax and plausibility, their per-class standardised "
        "versions, Mahalanobis on the traced layer's pooled activations and combinations. Writes DIR/"
        "detectors.json, detectors.md and roc.png: AUROC with bootstrap 95% intervals, differences from "
        "max-softmax with verdicts, clean flag rates per class (true and predicted) at each candidate's calibrated "
        "per-class thresholds with binomial 95% intervals, and the mean clean trace plausibility per class."
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory, e.g. models/shapes/1")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--data", default=EVAL_DATA, help=f"held-out clean images, test split (default {EVAL_DATA})")
    parser.add_argument("--fpr-data", default=FPR_DATA,
                        help=f"more held-out clean images for the flag rates, test split (default {FPR_DATA})")
    parser.add_argument("--calibration", default=DetectorEvalConfig.calibration,
                        help=f"calibration images, val split (default {DetectorEvalConfig.calibration})")
    parser.add_argument("--fit-limit", type=int, help="fit the Mahalanobis means on the first N training images")
    parser.add_argument("--fpr", type=float, default=0.05, help="target clean flag rate (default 0.05)")
    parser.add_argument("--eps-cap", type=float, default=32 / 255, help="white-box pool eps cap (default 32/255)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of both pools (default 10)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="detector kinds, comma-separated")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--json", action="store_true", help="print detectors.json")


def run(args: argparse.Namespace) -> int:
    from conceptlens.training.detector_eval import DetectorEvalConfig, evaluate_detectors, to_markdown

    if not args.bundle.is_dir():
        raise InvalidInput("--bundle", f"not a bundle directory: {args.bundle}")
    if not 0 < args.eps_cap <= 1:
        raise InvalidInput("--eps-cap", f"must lie in (0, 1], got {args.eps_cap}")
    if args.steps < 1 or args.resamples < 10:
        raise InvalidInput("--steps", "steps must be >= 1 and resamples >= 10")
    candidates = tuple(k.strip() for k in args.candidates.split(",") if k.strip())
    cfg = DetectorEvalConfig(bundle=args.bundle, out=args.out, data=args.data, fpr_data=args.fpr_data,
                             calibration=args.calibration,
                             fit_limit=args.fit_limit, fpr=args.fpr, eps_cap=args.eps_cap, steps=args.steps,
                             candidates=candidates, resamples=args.resamples)
    results = evaluate_detectors(cfg)
    print(json.dumps(results, indent=1) if args.json else to_markdown(results))
    return 0
