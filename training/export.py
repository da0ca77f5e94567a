"""Write a servable bundle (docs/design.md §6): model.onnx + weights.safetensors + manifest.json, checked at export.

The ONNX graph takes "images" (N,3,H,W) float32 in [0,1] (normalisation is inside, as in ImageClassifier) and
returns "logits" then one activation per traced layer named by the layer; the batch axis is dynamic. Before the
bundle is published, ONNX Runtime is run on a batch of a different size than the traced one and compared with
torch on every output (tolerance: handlers.bundle.ATOL + RTOL·max|torch|). The bundle is written to a temporary
sibling directory and renamed into place, so a watcher never sees half a bundle.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlens.handlers import bundle as B
from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.hooks import capture
from conceptlens.handlers.zoo import ImageClassifier, resolve_layer, save_weights

from .atomic_dir import replace_dir

log = logging.getLogger(__name__)

OPSET = 17


class WithActivations(nn.Module):
    """`images -> (logits, *activations)` for ONNX export: the traced layers' outputs become graph outputs."""

    def __init__(self, model: ImageClassifier, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with capture(self.model, self.layers) as acts:
            logits = self.model(images)
        return (logits, *(acts[name] for name in self.layers))


def export_bundle(
    model: ImageClassifier,
    out_dir: str | Path,
    *,
    name: str,
    version: int,
    layers: Sequence[str] | None = None,
    dissection: Mapping[str, Any] | str | Path | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    detector: Mapping[str, Any] | None = None,
) -> Path:
    """Export `model` to the bundle directory `out_dir` (usually `<repo>/<name>/<version>`) and return it.

    `layers` defaults to the dissection's layers, else the architecture's default layers. `dissection` (a
    dissection.json dict, the file, or its report directory) supplies per-unit labels, baselines b_k and the
    concept-class co-occurrence; without it labels are "" (not a detector) and baselines 0. `detector` (keyword
    arguments of `training.calibrate.calibrate_bundle`, e.g. {"kind": "mahalanobis", "fpr": 0.05}) fits and
    calibrates the adversarial detector on the bundle before it is published; None leaves it out.
    Raises InvalidInput for bad arguments and BundleError when ONNX and torch disagree.
    """
    if not isinstance(model, ImageClassifier):
        raise InvalidInput("model", f"expected an ImageClassifier, got {type(model).__name__}")
    if not name or "/" in name or name.startswith("."):
        raise InvalidInput("name", f"must be a plain non-empty name, got {name!r}")
    if int(version) < 1:
        raise InvalidInput("version", f"must be >= 1, got {version}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidInput("out", f"{out} exists and is not empty (pass overwrite to replace it)")
    diss = load_dissection(dissection) if dissection is not None else None
    if layers is None:
        layers = list(diss["layers"]) if diss else list(model.spec.default_layers)
    layers = list(layers)
    if not layers:
        raise InvalidInput("layers", "need at least one layer to trace")
    for layer in layers:
        resolve_layer(model, layer)  # UnknownName lists the valid ones
    if len(set(layers)) != len(layers) or B.LOGITS_NAME in layers or B.INPUT_NAME in layers:
        raise InvalidInput("layers", f"must be unique and not logits/images: {layers}")

    cpu_model = copy.deepcopy(model).cpu().eval()
    with replace_dir(out) as tmp:
        _write_onnx(cpu_model, layers, tmp / B.ONNX_FILE)
        save_weights(cpu_model, tmp / B.WEIGHTS_FILE)
        probe = torch.rand(3, len(cpu_model.mean.flatten()), cpu_model.input_size, cpu_model.input_size,
                           generator=torch.Generator().manual_seed(1))
        errors = B.check_onnx_matches(cpu_model, layers, tmp / B.ONNX_FILE, probe)
        log.info("ONNX vs torch max abs error: %s", {k: f"{v:.2e}" for k, v in errors.items()})
        ref = B.torch_outputs(cpu_model, layers, probe[:1])
        infos = [_layer_info(layer, ref[layer].shape[1], diss) for layer in layers]
        files = {f: B.sha256_file(tmp / f) for f in (B.ONNX_FILE, B.WEIGHTS_FILE)}
        manifest = B.manifest_dict(
            name=name,
            version=int(version),
            architecture=model.arch,
            classes=model.classes,
            input_spec=B.InputSpec(
                size=int(model.input_size),
                channels=int(cpu_model.mean.numel()),
                mean=[float(v) for v in cpu_model.mean.flatten()],
                std=[float(v) for v in cpu_model.std.flatten()],
                value_range=[0.0, 1.0],
            ),
            layers=infos,
            cooccurrence=(diss or {}).get("cooccurrence", {}),
            metrics={**_dissection_metrics(diss), **dict(metrics or {}),
                     "onnx_max_abs_error": {k: float(v) for k, v in errors.items()}},
            provenance=_provenance(provenance),
            files=files,
        )
        B.Manifest.from_json(manifest)  # never publish a manifest the loader would refuse
        (tmp / B.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        if detector is not None:
            from conceptlens.training.calibrate import calibrate_bundle

            calibrate_bundle(tmp, **dict(detector))
        for file in tmp.iterdir():
            file.chmod(0o644)
    log.info("wrote bundle %s v%s to %s", name, version, out)
    return out


def _write_onnx(model: ImageClassifier, layers: Sequence[str], path: Path) -> None:
    wrapper = WithActivations(model, layers).eval()
    example = torch.rand(2, model.mean.numel(), model.input_size, model.input_size)
    outputs = B.onnx_output_names(layers)
    dynamic = {n: {0: "batch"} for n in [B.INPUT_NAME, *outputs]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; dynamo needs onnxscript
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[B.INPUT_NAME], output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))


def load_dissection(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A dissection.json as a dict, from a dict, the file or the report directory holding it."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "dissection.json"
        if not path.is_file():
            raise InvalidInput("dissection", f"no dissection.json at {path}")
        data = json.loads(path.read_text())
    if not isinstance(data.get("layers"), Mapping):
        raise InvalidInput("dissection", "expected an object with a 'layers' mapping (a dissection.json)")
    return data


def _layer_info(layer: str, units: int, diss: Mapping[str, Any] | None) -> B.LayerInfo:
    entry = (diss or {}).get("layers", {}).get(layer)
    if entry is None:
        if diss is not None:
            log.warning("layer %s was not dissected: unit labels left empty, baselines 0", layer)
        return B.LayerInfo(layer, units, [0.0] * units, [B.UnitInfo(i) for i in range(units)])
    rows = entry["units"]
    if len(rows) != units:
        raise InvalidInput("dissection", f"layer {layer} has {len(rows)} units in the dissection, model has {units}")
    infos = [
        B.UnitInfo(i, str(r.get("label", "")), str(r.get("category", "")), float(r.get("iou", 0.0)),
                   bool(r.get("detector", False)))
        for i, r in enumerate(rows)
    ]
    return B.LayerInfo(layer, units, [float(r.get("baseline", 0.0)) for r in rows], infos)


def _dissection_metrics(diss: Mapping[str, Any] | None) -> dict[str, Any]:
    if not diss:
        return {}
    return {"dissection": {layer: entry.get("metrics", {}) for layer, entry in diss["layers"].items()}}


def _provenance(given: Mapping[str, Any] | None) -> dict[str, Any]:
    prov = dict(given or {})
    prov.setdefault("git_commit", git_commit())
    prov.setdefault("exported_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    prov.setdefault("torch", torch.__version__)
    prov.setdefault("opset", OPSET)
    return json.loads(json.dumps(prov, default=str))  # JSON-safe: Paths, tuples, dataclass reprs


def git_commit() -> str:
    """The source tree's commit (with "-dirty" when it has local changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
