"""The `conceptlens` command: one subcommand per offline or online job.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`. Only the module of
the command being run is imported (torch, grpc and friends cost seconds), so every invocation stays quick.
User errors (our domain errors, bad paths) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from conceptlens.handlers.allocator import tune_allocator
from conceptlens.handlers.errors import ConceptLensError
from conceptlens_client.pipes import quiet_closed_pipe

# command -> (module, one-line help). Nested groups ("data shapes") use a dict of their own.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "data": {
        "shapes": ("conceptlens.training.data.cli", "generate the ShapesWorld concept dataset in Broden layout"),
    },
    "import": ("conceptlens.training.cli_import", "bring a trained torchvision/timm CNN and its weights in as a run"),
    "train": ("conceptlens.training.cli_train", "train a classifier (standard, adversarial or consistent loss)"),
    "evaluate": ("conceptlens.training.cli_evaluate", "clean and robust accuracy of a run or bundle"),
    "dissect": ("conceptlens.training.cli_dissect", "label every unit with a concept; consistency metrics"),
    "export": ("conceptlens.training.cli_export", "write a servable bundle (ONNX + safetensors + manifest)"),
    "calibrate": ("conceptlens.training.cli_calibrate", "add or refit a bundle's calibrated adversarial detector"),
    "experiment": {
        "paper": ("conceptlens.training.cli_experiment", "reproduce the paper's comparison on ShapesWorld"),
        "detectors": ("conceptlens.training.cli_detectors", "compare adversarial detectors on one bundle"),
    },
    "serve": ("conceptlens.server.cli", "start the gRPC predict-and-explain service"),
    "front": ("conceptlens.server.cli_front", "run nginx in front of the service to shed overload outside Python"),
}


def _add(sub: argparse._SubParsersAction, name: str, target: tuple[str, str] | dict, chosen: list[str]) -> None:
    """Add one command; only the command being run (`chosen` is argv's leading words) imports its module."""
    if isinstance(target, dict):
        group = sub.add_parser(name, help=f"{name} commands: {', '.join(target)}")
        inner = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        rest = chosen[1:] if chosen[:1] == [name] else []
        for child, child_target in target.items():
            _add(inner, child, child_target, rest)
        return
    module_name, help_text = target
    parser = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    parser.set_defaults(_module=module_name)
    if chosen[:1] != [name]:
        return
    try:
        importlib.import_module(module_name).configure(parser)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        parser.set_defaults(_missing=True)  # command planned but not built in this checkout


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conceptlens", description="Train, dissect, export and serve interpretable image classifiers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = [word for word in argv if not word.startswith("-")][:2]
    for name, target in COMMANDS.items():
        _add(sub, name, target, chosen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_closed_pipe(lambda: _main(argv))  # `conceptlens ... | head`: exit 141 without a message


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    command = " ".join(word for word in argv if not word.startswith("-"))
    command = " ".join(command.split()[: 2 if isinstance(COMMANDS.get(args.command), dict) else 1])
    if getattr(args, "_missing", False):
        parser.exit(2, f"conceptlens: error: '{command}' is not available in this build\n")
    tune_allocator()  # before torch allocates anything: see handlers/allocator.py
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConceptLensError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"conceptlens {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"conceptlens {command}: interrupted", file=sys.stderr)
        return 130
