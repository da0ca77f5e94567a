"""What dissection runs on: a model from a run directory or a bundle, and a concept dataset by path or spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.zoo import ImageClassifier


def open_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """A run directory (run.json) or a bundle (manifest.json) -> (model in eval mode, description)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from conceptlens.handlers.bundle import load_bundle

        bundle = load_bundle(path, verify_onnx=False)  # hashes and schema still checked
        model = bundle.torch_model(device)
        return model, {"source": str(path), "kind": "bundle", "architecture": model.arch,
                       "name": bundle.manifest.name, "version": bundle.manifest.version}
    if (path / "run.json").is_file():
        from conceptlens.training.run import load_run, read_run

        model = load_run(path, device=str(device))
        meta = read_run(path)
        return model, {"source": str(path), "kind": "run", "architecture": model.arch,
                       "regime": meta.get("regime"), "lambda": meta.get("lambda"), "eps": meta.get("eps")}
    raise InvalidInput("--model", f"{path} is neither a run directory (run.json) nor a bundle (manifest.json)")


def open_concepts(spec: str, size: int) -> tuple[Any, dict[str, Any]]:
    """A Broden directory (or "broden:PATH", optionally "PATH@split") or "shapes:N[:SEED]" (ShapesWorld in memory)."""
    if spec.startswith("shapes"):
        from conceptlens.training.data.shapes import ShapesWorld

        parts = spec.split(":")
        try:
            n = int(parts[1]) if len(parts) > 1 else 500
            seed = int(parts[2]) if len(parts) > 2 else 1
        except ValueError:
            raise InvalidInput("--data", f"expected shapes:N[:SEED], got {spec!r}") from None
        return ShapesWorld(n, size=size, seed=seed, with_masks=True), {"source": spec, "kind": "shapes",
                                                                      "n": n, "seed": seed}
    from conceptlens.training.data.broden import BrodenDataset

    root = spec.removeprefix("broden:")
    split = None
    if "@" in root:
        root, split = root.rsplit("@", 1)
    if not Path(root).is_dir():
        raise InvalidInput("--data", f"no Broden directory at {root}")
    data = BrodenDataset(root, split=split, size=size)
    return data, {"source": str(root), "kind": "broden", "split": split}
