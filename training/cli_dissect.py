"""`conceptlens dissect`: label every unit of some layers with a concept (Network Dissection) and report the
consistency metrics, writing dissection.json and report.html."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from conceptlens.handlers.errors import InvalidInput

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    from conceptlens.training.dissect.engine import MASK_SIZE

    parser.description = (
        "Network Dissection of a run or bundle on a concept dataset: per-unit top-q thresholds from a streaming "
        "sketch, IoU with every concept, labels and detectors; unit consistency, MIS and (with --adversarial) "
        "label stability and representation consistency r under targeted PGD. Writes REPORT_DIR/dissection.json "
        "and REPORT_DIR/report.html."
    )
    parser.add_argument("--model", required=True, type=Path, help="a run directory (run.json) or bundle directory")
    parser.add_argument("--data", required=True,
                        help="a Broden directory (PATH, broden:PATH, PATH@split) or shapes:N[:SEED] (ShapesWorld "
                             "in memory, its val split: the same images `evaluate --data` reads)")
    parser.add_argument("--layers", help="comma-separated layer names (default: the architecture's default layers)")
    parser.add_argument("--out", required=True, type=Path, help="report directory to write")
    parser.add_argument("--adversarial", action="store_true",
                        help="also dissect targeted-PGD versions of the images (label stability, r, real ∪ adv)")
    parser.add_argument("--eps", type=float, default=8 / 255, help="L∞ budget of the PGD attack (default 8/255)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--affinity", type=Path, help='JSON {"classes": [...], "matrix": [[...]]}: A in pᵀAp')
    parser.add_argument("--quantile", type=float, default=0.005, help="top-q activation quantile (default 0.005)")
    parser.add_argument("--iou-threshold", type=float, default=0.04, help="detector IoU threshold (default 0.04)")
    parser.add_argument("--batch-size", type=int,
                        help="images per batch (default: 64 up to 64-px models, fewer for larger inputs, e.g. 16 "
                             "at 224 px, so a batch's activations stay about the same size)")
    parser.add_argument("--max-images", type=int, help="use only the first N images")
    parser.add_argument("--top-k", type=int, default=50, help="top images per unit for consistency (default 50)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if present")
    parser.add_argument("--chunk-mb", type=int, default=32,
                        help="activations and masks per bookkeeping update, in MB (default 32; at least one batch): "
                             "bigger amortises per-update cost, smaller bounds memory (CPU or GPU) more tightly")
    parser.add_argument("--cache-dir", type=Path,
                        help="where pass 1 spills what pass 2 needs (the maps that may top a unit's threshold, and "
                             "compact masks) so pass 2 skips the forward pass (default: the system temp directory; "
                             "disk grows with the images, memory does not; deleted afterwards; skipped with a "
                             "warning if it would fill more than half the free space)")
    parser.add_argument("--no-cache", action="store_true",
                        help="run the model again in pass 2 instead of caching pass 1 on disk")
    parser.add_argument("--mask-size", type=int, default=MASK_SIZE,
                        help=f"count the IoU on masks of at most this many pixels a side, longer ones subsampled "
                             f"(default {MASK_SIZE}: NetDissect's resolution for 224-px Broden; 0: the masks' own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random start and targets")
    parser.add_argument("--json", action="store_true", help="print the per-layer metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from conceptlens.training.data.registry import open_concepts
    from conceptlens.training.dissect.engine import DissectConfig, dissect
    from conceptlens.training.dissect.metrics import load_affinity
    from conceptlens.training.dissect.report import write_report
    from conceptlens.training.run import open_model

    for name in ("steps", "top_k", "chunk_mb"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(args, name)}")
    if not 0 < args.quantile < 1:
        raise InvalidInput("--quantile", f"must be in (0, 1), got {args.quantile}")
    if not 0 <= args.eps <= 1:
        raise InvalidInput("--eps", f"must be in [0, 1], got {args.eps}")
    if args.mask_size < 0:
        raise InvalidInput("--mask-size", f"must be >= 0, got {args.mask_size}")
    if args.max_images is not None and args.max_images < 1:
        raise InvalidInput("--max-images", f"must be >= 1, got {args.max_images}")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInput("--out", f"{args.out} exists and is not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device", "cuda requested but no GPU is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    model, model_info = open_model(args.model, device)
    layers = tuple(s.strip() for s in args.layers.split(",") if s.strip()) if args.layers else model.spec.default_layers
    affinity = load_affinity(args.affinity, model.classes) if args.affinity else None
    if args.batch_size is None:
        args.batch_size = default_batch_size(model.input_size)
    if args.batch_size < 1:
        raise InvalidInput("--batch-size", f"must be >= 1, got {args.batch_size}")
    data, data_info = open_concepts(args.data, model.input_size)
    config = DissectConfig(layers=tuple(layers), quantile=args.quantile, iou_threshold=args.iou_threshold,
                           batch_size=args.batch_size, top_k=args.top_k, adversarial=args.adversarial,
                           eps=args.eps, steps=args.steps, seed=args.seed, max_images=args.max_images,
                           cache=not args.no_cache, cache_dir=str(args.cache_dir) if args.cache_dir else None,
                           chunk_bytes=args.chunk_mb << 20, mask_size=args.mask_size or None)
    start = time.perf_counter()
    result = dissect(model, data, config, affinity=affinity)
    seconds = time.perf_counter() - start
    doc = write_report(result, args.out, model=model, dataset=data, model_info=model_info,
                       data_info={**data_info, "images": result.images, "seconds": round(seconds, 2)})
    summary = {name: {k: v for k, v in layer["metrics"].items() if not k.endswith("per_unit")}
               for name, layer in doc["layers"].items()}
    if args.json:
        print(json.dumps({"out": str(args.out), "images": result.images, "seconds": round(seconds, 2),
                          "layers": summary}, indent=1))
    else:
        for name, m in summary.items():
            print(f"{name}: {m['detectors']}/{m['units']} detectors, unique {m['unique_detectors']['all']}, "
                  f"consistency {m.get('consistency_real', float('nan')):.3f}")
        print(f"wrote {args.out / 'report.html'}")
    return 0


def default_batch_size(input_size: int) -> int:
    """64 images per batch up to 64 px; above, 64·64/size rounded down to a multiple of 8 (32 at 128 px, 16 at
    224 px, never below 8): larger images mean fewer per batch, so a batch's activations and masks, and the
    chunks built from them, stay within a few times their 64-px size."""
    return max(8, min(64, int(64 * 64 / max(int(input_size), 1)) // 8 * 8))
