"""`conceptlens experiment paper`: standard, PGD-AT, consistent-loss and CSG regimes over several seeds, dissected,
attacked and compared with 95% intervals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

DEFAULT_BASE = Path("configs/shapes_consistent.toml")


def configure(parser: argparse.ArgumentParser) -> None:
    from conceptlens.training.experiment import REGIMES

    parser.description = (
        "Reproduce the paper's comparison on ShapesWorld: train standard, PGD-AT (λ = 0), consistent-loss, CSG and "
        "CSG + consistent models from one base config (same data, epochs, ε) for every seed; dissect each on the "
        "same probe images; measure the white-box minimal-ε pool and a shared transfer pool (made once against "
        "held-out surrogate models) with their flip rates; compare the adversarial detectors on seed 0 of each "
        "regime. Writes DIR/results.md, results.json and figures/ (runs, reports, bundles and detector tables under "
        "DIR too); every metric has a bootstrap 95% interval over seeds and units or images. Finished runs in "
        "DIR/runs are reused."
    )
    parser.add_argument("--out", required=True, type=Path, help="experiment directory")
    parser.add_argument("--config", type=Path,
                        help=f"base training TOML (default: {DEFAULT_BASE} when present, else trainer defaults)")
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="override a base-config key for every regime (repeatable)")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="λ of the consistent loss (default 1)")
    parser.add_argument("--csg-weight", type=float, default=0.05, help="weight of the CSG sparsity loss (0.05)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"regimes (default {','.join(REGIMES)})")
    parser.add_argument("--lambdas", default="", help="λ sweep: extra consistent regimes, e.g. 0.1,0.3,3")
    parser.add_argument("--layer-sets", default="",
                        help="layer sweep: extra consistent regimes, ';'-separated sets, e.g. layer3;layer2,layer3")
    parser.add_argument("--probe-images", type=int, default=500, help="ShapesWorld images dissected (default 500)")
    parser.add_argument("--pool-images", type=int, default=90,
                        help="images of the white-box and shared pools and robust accuracy (default 90)")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps at dissection and in pools (10)")
    parser.add_argument("--no-detectors", action="store_true", help="skip the per-regime detector comparison")
    parser.add_argument("--quick", action="store_true", help="tiny budget (a smoke test for the tests)")
    parser.add_argument("--json", action="store_true", help="print results.json")


def _numbers(text: str, field: str, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInput(field, f"expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from conceptlens.training.experiment import REGIMES, ExperimentConfig, run_experiment, to_markdown

    if args.config is not None and not args.config.is_file():
        raise InvalidInput("--config", f"no such file: {args.config}")
    if args.lam <= 0:
        raise InvalidInput("--lambda", f"must be > 0 (λ = 0 is the PGD-AT baseline), got {args.lam}")
    if args.csg_weight <= 0:
        raise InvalidInput("--csg-weight", f"must be > 0, got {args.csg_weight}")
    if args.probe_images < 1 or args.attack_steps < 1 or args.pool_images < 1:
        raise InvalidInput("--probe-images", "probe images, pool images and attack steps must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInput("--out", f"{args.out} exists and is not a directory")
    seeds = _numbers(args.seeds, "--seeds", int)
    if not seeds:
        raise InvalidInput("--seeds", "need at least one seed")
    regimes = tuple(r.strip() for r in args.regimes.split(",") if r.strip())
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise InvalidInput("--regimes", f"unknown {unknown}; valid: {', '.join(REGIMES)}")
    lambdas = _numbers(args.lambdas, "--lambdas", float)
    if any(v < 0 for v in lambdas):
        raise InvalidInput("--lambdas", "λ values must be >= 0")
    layer_sets = tuple(tuple(n.strip() for n in group.split(",") if n.strip())
                       for group in args.layer_sets.split(";") if group.strip())
    base = args.config or (DEFAULT_BASE if DEFAULT_BASE.is_file() else None)
    from conceptlens.training import config as train_config

    for item in args.set or []:
        train_config.parse_override(item)  # fail before any training on a malformed override
    cfg = ExperimentConfig(out=args.out, base_config=base, overrides=tuple(args.set or ()), lam=args.lam,
                           csg_weight=args.csg_weight, seeds=seeds, quick=args.quick, probe_images=args.probe_images,
                           pool_images=args.pool_images, attack_steps=args.attack_steps, regimes=regimes,
                           lambdas=lambdas, layer_sets=layer_sets, detectors=not args.no_detectors)
    results = run_experiment(cfg)
    print(json.dumps(results, indent=1) if args.json else to_markdown(results))
    return 0
