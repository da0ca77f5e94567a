"""`conceptlens evaluate`: clean accuracy and robust accuracy under PGD-k, overall and per class.

Examples:
  conceptlens evaluate --model runs/consistent --data shapes:1000
  conceptlens evaluate --model models/shapes/1 --data shapes:1000 --eps 8/255 --steps 20 --json
The model is a run directory (run.json + model.safetensors) or a bundle (manifest.json). The dataset's val
split is used unless --split says otherwise. The attack is the library's PGD (L∞ or L2, random start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

from .config import parse_number


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--model", required=True, metavar="RUN_DIR|BUNDLE", help="a training run or a model bundle")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="dataset spec: shapes[:N[:SEED]], broden:PATH, imagefolder:PATH, cifar10:PATH "
                             "(training/data/spec.py)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="dataset split (val)")
    parser.add_argument("--n", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--eps", default="8/255", help="PGD budget, e.g. 8/255 (L∞) or 0.5 (L2); 0: clean only")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations k (0: clean only)")
    parser.add_argument("--step-size", default=None, help="PGD step size (default 2.5·eps/steps)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"), help="threat model")
    parser.add_argument("--robust-n", type=int, default=None, help="attack only the first N images (default all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random start")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    from .data.registry import open_dataset
    from .evaluate import evaluate
    from .run import open_model

    eps = parse_number("eps", args.eps)
    step_size = None if args.step_size is None else parse_number("step-size", args.step_size)
    for name in ("steps", "batch_size", "n", "robust_n"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "batch_size" else 0):
            raise InvalidInput(name.replace("_", "-"), f"must be >= {1 if name == 'batch_size' else 0}, got {value}")
    if eps < 0:
        raise InvalidInput("eps", f"must be >= 0, got {eps}")
    path = Path(args.model)
    model, _ = open_model(path, args.device)
    dataset = open_dataset(args.data, args.split, size=model.input_size)
    if list(dataset.classes) != list(model.classes):
        raise InvalidInput("data", f"classes {list(dataset.classes)[:5]}... differ from the model's "
                           f"{list(model.classes)[:5]}...")
    result = evaluate(model, dataset, eps=eps, steps=args.steps, step_size=step_size, norm=args.norm, n=args.n,
                      robust_n=args.robust_n, batch_size=args.batch_size, seed=args.seed, progress=True)
    result["model"], result["data"] = str(path), f"{args.data} ({args.split})"
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    robust = result["robust_accuracy"]
    attack = result["attack"]
    print(f"clean accuracy  {result['clean_accuracy']:.4f}  ({result['n']} images)")
    if robust is not None:
        print(f"robust accuracy {robust:.4f}  ({result['robust_n']} images, PGD-{attack['steps']} "
              f"{attack['norm']} eps={attack['eps']:.4g})")
    print(f"{'class':<16}{'n':>6}{'clean':>9}{'robust':>9}")
    for name, c in result["per_class"].items():
        clean = "-" if c["clean_accuracy"] is None else f"{c['clean_accuracy']:.3f}"
        rob = "-" if c["robust_accuracy"] is None else f"{c['robust_accuracy']:.3f}"
        print(f"{name:<16}{c['n']:>6}{clean:>9}{rob:>9}")
    return 0
