"""`conceptlens experiment paper`: standard vs PGD-AT vs consistent-loss training, dissected and compared."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

DEFAULT_BASE = Path("configs/shapes_consistent.toml")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Reproduce the paper's comparison on ShapesWorld: train standard, PGD-AT (λ = 0) and consistent-loss "
        "models from one base config (same data, epochs, seed, ε), dissect each on the same probe images with "
        "targeted PGD, and write DIR/results.md and DIR/results.json (runs and reports under DIR too). "
        "Finished runs in DIR/runs are reused."
    )
    parser.add_argument("--out", required=True, type=Path, help="experiment directory")
    parser.add_argument("--config", type=Path,
                        help=f"base training TOML (default: {DEFAULT_BASE} when present, else trainer defaults)")
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="override a base-config key for all three regimes (repeatable)")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="λ of the consistent loss (default 1)")
    parser.add_argument("--probe-images", type=int, default=500, help="ShapesWorld images dissected (default 500)")
    parser.add_argument("--attack-steps", type=int, default=10, help="targeted PGD steps at dissection (default 10)")
    parser.add_argument("--quick", action="store_true", help="tiny budget (a smoke test, < 90 s on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print results.json")


def run(args: argparse.Namespace) -> int:
    from conceptlens.training.experiment import ExperimentConfig, run_experiment, to_markdown

    if args.config is not None and not args.config.is_file():
        raise InvalidInput("--config", f"no such file: {args.config}")
    if args.lam <= 0:
        raise InvalidInput("--lambda", f"must be > 0 (λ = 0 is the PGD-AT baseline), got {args.lam}")
    if args.probe_images < 1 or args.attack_steps < 1:
        raise InvalidInput("--probe-images", "probe images and attack steps must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInput("--out", f"{args.out} exists and is not a directory")
    base = args.config or (DEFAULT_BASE if DEFAULT_BASE.is_file() else None)
    from conceptlens.training import config as train_config

    for item in args.set or []:
        train_config.parse_override(item)  # fail before any training on a malformed override
    cfg = ExperimentConfig(out=args.out, base_config=base, overrides=tuple(args.set or ()), lam=args.lam,
                           quick=args.quick, probe_images=args.probe_images, attack_steps=args.attack_steps)
    results = run_experiment(cfg)
    print(json.dumps(results, indent=1) if args.json else to_markdown(results))
    return 0
