"""Helpers for the service and client tests: a small_cnn bundle (random weights with warmed BatchNorm
statistics, a made-up dissection so units carry concepts), repositories holding copies of it, server configs
for loopback on a free port."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from conceptlens.handlers.zoo import build_model
from conceptlens.server.config import Limits, ServerConfig
from conceptlens.training.export import export_bundle

CLASSES = ["car", "house", "tree", "boat"]
SIZE = 32
CONCEPTS = ["wheel", "window", "leaf", "sail", "red", "stripes"]


def dissection(units: dict[str, int]) -> dict:
    """Every third unit a detector of some concept; baselines non-zero so Δ differs from plain activation."""
    layers = {}
    for layer, n in units.items():
        rows = []
        for k in range(n):
            concept = CONCEPTS[k % len(CONCEPTS)] if k % 3 == 0 else ""
            rows.append({"label": concept, "category": "part" if concept else "", "iou": 0.05 + 0.01 * (k % 20)
                         if concept else 0.0, "detector": bool(concept), "baseline": 0.02 * (k % 7)})
        layers[layer] = {"units": rows}
    cooc = {c: {cls: (0.9 if (i + j) % 4 == 0 else 0.1) for j, cls in enumerate(CLASSES)}
            for i, c in enumerate(CONCEPTS)}
    return {"layers": layers, "cooccurrence": cooc}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small_cnn", CLASSES, input_size=SIZE)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not an identity normalisation
        model.train()
        for _ in range(3):
            model(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


def export(model: torch.nn.Module, out: Path, version: int = 1) -> Path:
    """Export `model` as bundle small/<version> with three traced, "dissected" layers."""
    return export_bundle(model, out, name="small", version=version, layers=["layer1", "layer2", "layer3"],
                         dissection=dissection({"layer1": 32, "layer2": 64, "layer3": 128}),
                         metrics={"clean_accuracy": 0.25})


def make_repo(root: Path, bundle: Path, versions: tuple[int, ...] = (1,)) -> Path:
    for v in versions:
        shutil.copytree(bundle, root / "small" / str(v))
    return root


TEST_LIMITS = Limits(max_images=4, max_probe_images=2, max_message_bytes=1 << 20)


def config(repo: Path, **overrides) -> ServerConfig:
    base = ServerConfig(models=repo, host="127.0.0.1", port=0, metrics_port=0, poll_interval_s=0,
                        limits=TEST_LIMITS, grace_s=1.0)
    return replace(base, **overrides)
