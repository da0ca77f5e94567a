"""A finished run directory as other tools see it: `run.json` (what the model is) + `model.safetensors`.

`run.json` holds everything needed to rebuild the model and describe it in a bundle: architecture, classes,
input spec (size, channels, mean, std, value range), the traced layers, the regime with λ, α and the attack
(ε, steps), the seed, the git commit and the last validation metrics. `load_run` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptlens.handlers import zoo
from conceptlens.handlers.errors import InvalidInput

if TYPE_CHECKING:
    from .config import TrainConfig

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
RUN_SCHEMA = 1


def run_metadata(
    model: zoo.ImageClassifier,
    config: TrainConfig,
    *,
    layers: tuple[str, ...] | list[str],
    world_size: int,
    steps: int,
    metrics: dict[str, Any],
    git_commit: str | None,
) -> dict[str, Any]:
    """The run.json document for a trained `model`."""
    return {
        "schema_version": RUN_SCHEMA,
        "architecture": model.arch,
        "classes": list(model.classes),
        "input": {
            "size": model.input_size, "channels": int(model.mean.shape[1]),
            "mean": [float(v) for v in model.mean.flatten()], "std": [float(v) for v in model.std.flatten()],
            "value_range": [0.0, 1.0],
        },
        "layers": list(layers),
        "regime": config.regime,
        "lambda": config.loss.consistency_weight,
        "alpha": config.loss.adv_weight,
        "distance": config.loss.distance,
        "attack": {
            "name": config.attack.name, "eps": config.attack.eps, "step_size": config.attack.step_size,
            "steps": config.attack.steps, "norm": config.attack.norm,
        },
        "eps": config.attack.eps if config.attack.name != "none" else 0.0,
        "seed": config.run.seed,
        "epochs": config.run.epochs,
        "steps": steps,
        "world_size": world_size,
        "git_commit": git_commit,
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "metrics_per_class": metrics.get("per_class", {}),
        "config": config.to_dict(),
    }


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The parsed run.json of `run_dir`; a missing or broken file is an InvalidInput naming it."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise InvalidInput("run", f"{run_dir} is not a finished run ({RUN_FILE} missing)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput("run", f"{path}: {err}") from None
    for key in ("architecture", "classes", "input"):
        if key not in meta:
            raise InvalidInput("run", f"{path} lacks {key!r}")
    return meta


def load_run(run_dir: str | Path, device: str = "cpu") -> zoo.ImageClassifier:
    """Rebuild the run's model with its final weights, in eval mode."""
    meta = read_run(run_dir)
    spec = meta["input"]
    model = zoo.build_model(
        meta["architecture"], meta["classes"], input_size=spec["size"], mean=spec["mean"], std=spec["std"]
    ).to(device)
    zoo.load_weights(model, Path(run_dir) / WEIGHTS_FILE)
    return model.eval()


def open_model(path: str | Path, device: str = "cpu") -> tuple[zoo.ImageClassifier, dict[str, Any]]:
    """The one model opener of the commands: a run directory (run.json) or a bundle (manifest.json) -> (model in
    eval mode on `device`, a description for reports). A directory holding both is refused rather than one
    silently preferred: the two may hold different weights."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidInput("--model", f"no such directory: {path}")
    from conceptlens.handlers.bundle import MANIFEST

    is_run, is_bundle = (path / RUN_FILE).is_file(), (path / MANIFEST).is_file()
    if is_run and is_bundle:
        raise InvalidInput("--model", f"{path} is both a run directory ({RUN_FILE}) and a bundle ({MANIFEST}); "
                           "point at one or the other")
    if is_bundle:
        from conceptlens.handlers.bundle import load_bundle

        bundle = load_bundle(path, verify_onnx=False)  # hashes and schema still checked
        model = bundle.torch_model(str(device)).eval()
        return model, {"source": str(path), "kind": "bundle", "architecture": model.arch,
                       "name": bundle.manifest.name, "version": bundle.manifest.version}
    if is_run:
        meta = read_run(path)
        model = load_run(path, device=str(device))
        return model, {"source": str(path), "kind": "run", "architecture": model.arch,
                       "regime": meta.get("regime"), "lambda": meta.get("lambda"), "eps": meta.get("eps")}
    raise InvalidInput("--model", f"{path} is neither a run directory ({RUN_FILE}) nor a bundle ({MANIFEST})")
