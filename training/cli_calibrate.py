"""`conceptlens calibrate`: fit and calibrate a bundle's adversarial detector, in place, without retraining."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput


def configure(parser: argparse.ArgumentParser) -> None:
    from conceptlens.training.calibrate import DEFAULT_KIND

    parser.description = (
        "Add (or refit) the adversarial detector of an existing bundle: a Mahalanobis detector on the traced "
        "layer's pooled activations plus max-softmax by default, standardised and thresholded for a stated clean "
        "false-positive rate on held-out clean images. Writes detector.safetensors and the manifest's "
        "adversarial_detector entry; the other files and their hashes are untouched. `conceptlens export` does "
        "the same for new bundles."
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory, e.g. models/shapes/1")
    parser.add_argument("--kind", default=DEFAULT_KIND,
                        help="detector components joined by '+', each optionally weighted ('*0.3'): mahalanobis, "
                             f"max_softmax, plausibility (default {DEFAULT_KIND})")
    parser.add_argument("--fpr", type=float, default=0.05, help="clean false-positive rate to calibrate for (0.05)")
    parser.add_argument("--layer", help="traced layer for the Mahalanobis part (default: the head's layer)")
    parser.add_argument("--fit", help="dataset spec the class means are fitted on, train split (default: the "
                                      "training data in the bundle's provenance)")
    parser.add_argument("--fit-limit", type=int, help="use only the first N fit images")
    parser.add_argument("--calibration", default="shapes:900:1000",
                        help="held-out clean dataset spec, val split (default shapes:900:1000)")
    parser.add_argument("--json", action="store_true", help="print the manifest entry as JSON")


def run(args: argparse.Namespace) -> int:
    from conceptlens.training.calibrate import calibrate_bundle

    if not args.bundle.is_dir():
        raise InvalidInput("--bundle", f"not a bundle directory: {args.bundle}")
    if not 0 < args.fpr < 1:
        raise InvalidInput("--fpr", f"must lie in (0, 1), got {args.fpr}")
    if args.fit_limit is not None and args.fit_limit < 10:
        raise InvalidInput("--fit-limit", f"need at least 10 images, got {args.fit_limit}")
    entry = calibrate_bundle(args.bundle, kind=args.kind, layer=args.layer, fpr=args.fpr, fit=args.fit,
                             calibration=args.calibration, fit_limit=args.fit_limit)
    if args.json:
        print(json.dumps(entry, indent=1))
    else:
        print(f"{args.bundle}: {entry['kind']} detector on {entry['layer']}, threshold {entry['threshold']:.4f} "
              f"for a {100 * entry['target_fpr']:.1f}% clean flag rate (measured "
              f"{100 * entry['calibration']['clean_flag_rate']:.1f}% on {entry['calibration']['threshold_images']} "
              "held-out images)")
    return 0
