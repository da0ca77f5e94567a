"""`conceptlens import`: bring your own trained CNN (torchvision or timm, weights as a state dict) in as a run
directory that `dissect`, `evaluate` and `export` accept like one made by `conceptlens train`.

Examples:
  conceptlens import --arch resnet50 --weights resnet50_ft.pth --classes data/pets --out runs/pets
  conceptlens import --arch timm:convnext_tiny --weights convnext.safetensors --classes classes.txt --out runs/cx
  conceptlens import --arch timm:efficientnet_b0 --weights ckpt.pt --classes classes.txt --replace-head --out runs/e

--arch: a zoo name (small_cnn, resnet18...), any torchvision classification CNN (densenet121, efficientnet_b0),
or timm:NAME for any timm CNN. Vision transformers are refused (their units are tokens, not maps).
--weights: .safetensors, or a .pt/.pth state dict or checkpoint dict (state_dict / model key), read with
torch.load(weights_only=True): nothing in the file is executed. `module.` / `model.` prefixes are handled.
--classes: a text file with one class name per line (in output order), or an ImageFolder directory (its class
folders, sorted as torchvision sorts them; DIR/train/ is used when present).
Input size, mean and std default to timm's pretrained config for timm:NAME, else 224 px and ImageNet's.
Nothing is downloaded and nothing is written unless the whole import succeeds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from conceptlens.handlers.errors import InvalidInput

from .atomic_dir import replace_dir

IMPORT_REGIME = "imported"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Make a run directory (run.json + model.safetensors) from a trained torchvision or timm "
                          "CNN and its weights, ready for `conceptlens dissect`, `evaluate` and `export`.")
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--arch", required=True, help="zoo name, torchvision name, or timm:NAME")
    parser.add_argument("--weights", required=True, type=Path, help=".safetensors, or .pt/.pth state dict/checkpoint")
    parser.add_argument("--classes", required=True, type=Path,
                        help="class-name file (one per line) or ImageFolder directory")
    parser.add_argument("--out", required=True, type=Path, help="run directory to write")
    parser.add_argument("--replace-head", action="store_true",
                        help="the weights' head has another class count: keep a freshly initialised head for "
                             "--classes (fine-tune it with `conceptlens train`, model.init_weights)")
    parser.add_argument("--input-size", type=int, help="input side in pixels (default: timm config, else 224)")
    parser.add_argument("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406 (default: timm config/ImageNet)")
    parser.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225 (default: timm config/ImageNet)")
    parser.add_argument("--layers", help="comma-separated layers to trace and dissect (default: the last two stages)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    result = import_run(args.arch, args.weights, args.classes, args.out, replace_head=args.replace_head,
                        input_size=args.input_size, mean=_floats("--mean", args.mean),
                        std=_floats("--std", args.std), layers=layers, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"imported {result['architecture']} ({len(result['classes'])} classes, {result['input']['size']} px, "
              f"layers {', '.join(result['layers'])}) to {args.out}")
    return 0


def import_run(
    arch: str,
    weights: Path,
    classes: Path | list[str],
    out: Path,
    *,
    replace_head: bool = False,
    input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    layers: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build `arch`, load `weights` into it, check it runs, and write the run directory `out` atomically.
    Returns the run.json document. Raises InvalidInput / UnknownName (one line each) before writing anything."""
    import torch

    from conceptlens.handlers import zoo
    from conceptlens.handlers.bundle import sha256_file
    from conceptlens.handlers.hooks import capture
    from conceptlens.handlers.weights import fit_state_dict, head_name, read_state_dict

    from .run import RUN_FILE, RUN_SCHEMA, WEIGHTS_FILE

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InvalidInput("--out", f"{out} exists and is not empty (use --overwrite)")
    names = classes if isinstance(classes, list) else read_class_names(Path(classes))
    spec = zoo.arch_spec(arch)  # unknown names and non-CNNs fail here, in one line
    size, default_mean, default_std = _input_defaults(arch)
    size = int(input_size or size)
    if size < 8:
        raise InvalidInput("--input-size", f"must be at least 8 pixels, got {size}")
    mean, std = list(mean or default_mean), list(std or default_std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise InvalidInput("--mean/--std", f"need 3 values each, std > 0; got mean {mean}, std {std}")
    state = read_state_dict(weights)
    model = zoo.build_model(arch, names, input_size=size, mean=mean, std=std)
    fresh = fit_state_dict(model.net, state, head=head_name(model.net, spec.head), replace_head=replace_head,
                           arch=arch)
    model.eval()
    layers = list(layers or spec.default_layers)
    with torch.no_grad(), capture(model, layers) as acts:
        try:
            logits = model(torch.rand(1, 3, size, size))
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise InvalidInput("--input-size", f"{arch} does not run at {size} px: {first}") from None
    for layer in layers:
        if acts[layer].dim() != 4:
            raise InvalidInput("--layers", f"{layer} gives {tuple(acts[layer].shape)}, not (N, C, H, W) unit maps")
    if logits.shape[1] != len(names):
        raise InvalidInput("--classes", f"the model gives {logits.shape[1]} outputs for {len(names)} classes")
    meta = {
        "schema_version": RUN_SCHEMA,
        "architecture": arch,
        "classes": names,
        "input": {"size": size, "channels": 3, "mean": mean, "std": std, "value_range": [0.0, 1.0]},
        "layers": layers,
        "regime": IMPORT_REGIME,
        "lambda": None, "alpha": None, "attack": None, "eps": None, "seed": None, "epochs": 0, "steps": 0,
        "world_size": 1, "git_commit": None, "metrics": {},
        "imported": {"weights": str(Path(weights).resolve()), "sha256": sha256_file(Path(weights)),
                     "replaced_head": fresh, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
    }
    with replace_dir(out) as tmp:
        zoo.save_weights(model, tmp / WEIGHTS_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file (one per line, blank lines and #comments skipped) or an ImageFolder root."""
    if path.is_dir():
        root = path / "train" if (path / "train").is_dir() else path
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())  # torchvision's order
        if not names:
            raise InvalidInput("--classes", f"{root} has no class folders")
    elif path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    else:
        raise InvalidInput("--classes", f"no such file or directory: {path}")
    if len(names) < 2:
        raise InvalidInput("--classes", f"need at least 2 classes, {path} gives {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidInput("--classes", f"{path} repeats a class name")
    return names


def _input_defaults(arch: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    from conceptlens.handlers import external_archs, zoo

    if arch.startswith(external_archs.TIMM_PREFIX):  # timm's pretrained config says how the weights were trained
        derived = external_archs.derive(arch)
        return derived.default_input_size, derived.mean, derived.std
    return 224, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD


def _floats(flag: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidInput(flag, f"expected comma-separated numbers, got {text!r}") from None
