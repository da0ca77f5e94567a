"""Helpers for the deploy tests: the tool installer, free loopback ports, a tiny exported small_cnn bundle with a
made-up dissection (so traces carry concepts), and polling with a deadline."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from conceptlens.handlers.zoo import build_model
from conceptlens.training.export import export_bundle

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLASSES = ["car", "house", "tree", "boat"]
SIZE = 32
LAYERS = {"layer1": 32, "layer2": 64, "layer3": 128}
CONCEPTS = ["wheel", "window", "leaf", "sail"]
T = TypeVar("T")


@dataclass(frozen=True)
class Tools:
    """What tests/deploy/install_tools.sh reported; `require` skips a test only when a tool is still missing
    after the installer ran (e.g. no apt-get and no root on some machine), naming it and quoting the installer."""

    returncode: int
    log: str

    def require(self, *, exe: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> None:
        importlib.invalidate_caches()  # modules pip-installed during this session
        missing = [e for e in exe if shutil.which(e) is None]
        missing += [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{', '.join(missing)} could not be installed by tests/deploy/install_tools.sh "
                        f"(exit {self.returncode}): {self.log.strip()[-600:]}")


def install_tools() -> Tools:
    """Run tests/deploy/install_tools.sh once (idempotent: installs only what is missing)."""
    run = subprocess.run(["bash", str(Path(__file__).with_name("install_tools.sh")), sys.executable],
                         capture_output=True, text=True, timeout=900)
    return Tools(run.returncode, run.stdout + run.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `fn` until it returns something truthy; fail with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except OSError as err:  # not listening yet
            last = err
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


def dissection() -> dict:
    """Every third unit detects a concept; baselines non-zero; co-occurrence pairs concepts with classes."""
    layers = {}
    for layer, n in LAYERS.items():
        rows = []
        for k in range(n):
            concept = CONCEPTS[k % len(CONCEPTS)] if k % 3 == 0 else ""
            rows.append({"label": concept, "category": "part" if concept else "", "iou": 0.1 if concept else 0.0,
                         "detector": bool(concept), "baseline": 0.01 * (k % 5)})
        layers[layer] = {"units": rows}
    cooc = {c: {cls: (0.9 if i == j else 0.1) for j, cls in enumerate(CLASSES)} for i, c in enumerate(CONCEPTS)}
    return {"layers": layers, "cooccurrence": cooc}


def export_small(out: Path, version: int = 1) -> Path:
    """A random-weight small_cnn (BatchNorm statistics warmed) exported as bundle `small/<version>`."""
    torch.manual_seed(0)
    model = build_model("small_cnn", CLASSES, input_size=SIZE)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE))
    model.eval()
    return export_bundle(model, out, name="small", version=version, layers=list(LAYERS), dissection=dissection(),
                         metrics={"clean_accuracy": 0.25})


def make_repo(root: Path, bundle: Path) -> Path:
    shutil.copytree(bundle, root / "small" / "1")
    return root
