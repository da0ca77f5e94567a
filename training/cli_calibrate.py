"""`conceptlens calibrate`: fit and calibrate a bundle's adversarial detector, in place, without retraining."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput


def configure(parser: argparse.ArgumentParser) -> None:
    from conceptlens.training.calibrate import DEFAULT_CALIBRATION, DEFAULT_KIND

    parser.description = (
        "Add (or refit) the adversarial detector of an existing bundle: a Mahalanobis detector on the traced "
        "layer's pooled activations plus max-softmax by default, standardised and thresholded per predicted class "
        "for a stated clean false-positive rate on held-out clean images. Writes detector.safetensors and the "
        "manifest's adversarial_detector entry (class_thresholds beside the global threshold); the other files "
        "and their hashes are untouched. Prints the clean flag rate per class on the threshold images. The trace's "
        "plausibility is calibrated per class on the same held-out images first (manifest plausibility_calibration). "
        "`conceptlens export` does the same for new bundles."
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
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                        help="held-out clean dataset spec, val split; half standardises, half sets the thresholds, "
                             f"so a few hundred images per class (default {DEFAULT_CALIBRATION})")
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
        report = entry["calibration"]
        plaus = json.loads((args.bundle / "manifest.json").read_text()).get("plausibility_calibration")
        if plaus:
            counts = ", ".join(f"{c} {n}" for c, n in plaus["images"].items())
            print(f"{args.bundle}: trace plausibility calibrated per class against {plaus['data']} ({counts})")
        print(f"{args.bundle}: {entry['kind']} detector on {entry['layer']}, per-class thresholds for a "
              f"{100 * entry['target_fpr']:.1f}% clean flag rate (global threshold {entry['threshold']:.4f}; "
              f"measured {100 * report['clean_flag_rate']:.1f}% on {report['threshold_images']} held-out images)")
        for (name, rate), threshold in zip(report["class_clean_flag_rate"].items(), entry["class_thresholds"],
                                           strict=True):
            shown = "n/a" if rate is None else f"{100 * rate:.1f}%"
            print(f"  {name}: threshold {threshold:.4f}, clean flag rate {shown} on "
                  f"{report['class_threshold_images'][name]} images")
    return 0
