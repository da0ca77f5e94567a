"""`conceptlens train`: standard, adversarial or consistent-loss training from a TOML config and overrides.

Examples:
  conceptlens train --config configs/shapes_consistent.toml --out runs/consistent
  conceptlens train --config configs/shapes_standard.toml --set run.epochs=3 --lr 0.1 --out runs/std
  torchrun --nproc_per_node=2 -m conceptlens train --config configs/shapes_adversarial.toml --out runs/adv
  conceptlens train --resume runs/consistent          # continue a killed run exactly where it stopped
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

from . import config as cfg

# explicit flags -> the config key they override (`--set` reaches every key)
FLAGS: dict[str, str] = {
    "arch": "model.arch", "layers": "loss.layers", "data": "data.train", "val_data": "data.val",
    "epochs": "run.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "optimizer": "optim.name",
    "schedule": "optim.schedule", "attack": "attack.name", "eps": "attack.eps", "steps": "attack.steps",
    "lam": "loss.consistency_weight", "seed": "run.seed", "device": "run.device",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--config", metavar="FILE", help="TOML file (sections model, data, optim, attack, loss, "
                        "run, eval); omitted keys take the defaults")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory to create (required unless --resume)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint, "
                        "with its saved config (other options are refused)")
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set loss.distance=cosine (repeatable)")
    g = parser.add_argument_group("shortcuts for common keys")
    g.add_argument("--arch", help="architecture (model.arch), e.g. small_cnn, resnet18")
    g.add_argument("--layers", help="comma-separated layers for the consistency term (loss.layers)")
    g.add_argument("--data", help="training data spec (data.train): shapes[:N], imagefolder:PATH, cifar10:PATH ...")
    g.add_argument("--val-data", help="validation data spec (data.val); default: the training spec's val split")
    g.add_argument("--epochs", type=int, help="run.epochs")
    g.add_argument("--batch-size", type=int, help="global batch size, split over processes (data.batch_size)")
    g.add_argument("--lr", help="peak learning rate (optim.lr)")
    g.add_argument("--optimizer", help="sgd or adamw (optim.name)")
    g.add_argument("--schedule", help="cosine, step, onecycle or constant (optim.schedule)")
    g.add_argument("--attack", help="none (standard training) or a gradient attack kind of the catalogue, e.g. pgd "
                   "(attack.name; an unknown one lists them)")
    g.add_argument("--eps", help="attack budget, e.g. 8/255 (attack.eps)")
    g.add_argument("--steps", type=int, help="attack iterations (attack.steps)")
    g.add_argument("--lambda", dest="lam", help="consistency weight λ; 0 = plain adversarial training")
    g.add_argument("--seed", type=int, help="run.seed")
    g.add_argument("--device", help="auto, cpu or cuda (run.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the finished run's run.json to stdout")


def build_config(args: argparse.Namespace) -> cfg.TrainConfig:
    """The config the arguments describe (file, then shortcut flags, then --set), validated."""
    overrides = [f"{key}={_literal(getattr(args, flag))}" for flag, key in FLAGS.items()
                 if getattr(args, flag, None) is not None]
    overrides += args.overrides or []
    if args.no_progress:
        overrides.append("run.progress=false")
    config = cfg.load(args.config, overrides)
    cfg.validate(config)
    return config


def resume_config(run_dir: Path) -> cfg.TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise InvalidInput("resume", f"{run_dir} is not a run directory ({path.name} missing)")
    raw = json.loads(path.read_text())
    raw.pop("world_size", None)
    config = cfg.from_dict(raw, source=str(path))
    cfg.validate(config)
    return config


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    if args.resume:
        given = [f"--{f.replace('_', '-')}" for f in ("config", "out", *FLAGS) if getattr(args, f, None) is not None]
        if given or args.overrides:
            raise InvalidInput("resume", f"continues with the run's saved config; drop {', '.join(given) or '--set'}")
        out = Path(args.resume)
        config = resume_config(out)
        if args.no_progress:
            config = _without_progress(config)
    else:
        if not args.out:
            raise InvalidInput("out", "give --out RUN_DIR (or --resume RUN_DIR)")
        out = Path(args.out)
        config = build_config(args)
    run_dir = train(config, out, resume=bool(args.resume))
    from .distributed import detect

    if args.json and detect().is_main and (run_dir / "run.json").is_file():  # one copy under torchrun
        sys.stdout.write((run_dir / "run.json").read_text())
    return 0


def _without_progress(config: cfg.TrainConfig) -> cfg.TrainConfig:
    from dataclasses import replace

    return replace(config, run=replace(config.run, progress=False))


def _literal(value: object) -> str:
    """A flag value as the TOML literal `--set` expects (strings pass through and are parsed leniently)."""
    return str(value)
