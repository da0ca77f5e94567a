"""The README's "Your model in five commands" cannot drift from the code: every `$ conceptlens ...` and
`$ conceptlens-client ...` command in it parses with the real argument parsers, the commands chain (each reads
what an earlier one wrote), and the export note it shows is the one the export prints. Running them for real
takes minutes (a ConvNeXt-T dissection and fine-tune); tests/server/test_byom.py and
tests/training/test_byom_export.py run the same steps at small scale."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conceptlens.cli import build_parser
from conceptlens_client.cli import build_parser as client_parser

ROOT = Path(__file__).resolve().parents[1]


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your model in five commands")
    return text[start:text.index("\n## ", start + 1)]


def commands() -> list[tuple[str, list[str]]]:
    """(command, lines shown under it) for every `$ ` line of the section's code blocks."""
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```\n(.*?)```", section(), flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:].split("  #")[0].strip(), []))
            elif steps:
                steps[-1][1].append(line)
    return steps


def test_the_section_walks_import_to_fine_tune():
    words = [shlex.split(command)[:2] for command, _ in commands()]
    assert [w[1] for w in words if w[0] == "conceptlens"] == ["import", "data", "dissect", "export", "serve", "train"]
    assert ["conceptlens-client", "probe"] in words


@pytest.mark.parametrize("command", [c for c, _ in commands()], ids=lambda c: " ".join(shlex.split(c)[:2]))
def test_every_command_parses(command):
    argv = shlex.split(command)
    parser = build_parser(argv[1:]) if argv[0] == "conceptlens" else client_parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(f"the README's `{command}` does not parse (exit {exit_.code})")


READS = {"import": ("weights", "classes"), "dissect": ("model", "data"), "export": ("run", "dissection"),
         "serve": ("models",), "train": ("config",)}


def test_each_input_comes_from_an_earlier_step_and_the_export_note_is_the_real_one():
    made = {"cx.safetensors", "classes.txt", "configs/shapes_consistent.toml"}  # the stand-ins the text makes
    for command, shown in commands():
        argv = shlex.split(command)
        if argv[0] == "conceptlens-client":
            args = client_parser().parse_args(argv[1:])
            for image in getattr(args, "images", []):
                assert any(str(image).startswith(f"{m}/") for m in made), f"no earlier step makes {image}"
            continue
        args = build_parser(argv[1:]).parse_args(argv[1:])
        reads = [str(getattr(args, name)) for name in READS.get(argv[1], ())]
        overrides = getattr(args, "overrides", None) or []  # train's --set
        reads += [v.split("=", 1)[1] for v in overrides if v.startswith("model.init_weights=")]
        for path in reads:
            assert path in made, f"`{command}` reads {path}, which no earlier step makes"
        if getattr(args, "out", None):
            made.update({str(args.out), Path(args.out).parts[0]})
        if argv[1] == "export":
            (note,) = [line for line in shown if line.startswith("note:")]
            assert note == (f"note: no adversarial detector ({args.run} names no training data to fit it on); add "
                            f"one with `conceptlens calibrate --bundle {args.out} --fit DATA --calibration DATA`")
    assert "run_cx" in made and "model.init_weights=run_cx" in commands()[-1][0]
