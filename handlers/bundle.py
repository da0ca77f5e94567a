"""The model bundle (docs/design.md §6): load, validate and verify `<name>/<version>/` directories.

A bundle is `model.onnx` (input "images" (N,3,H,W) float32 in [0,1], outputs "logits" then one activation per
traced layer named exactly by the layer name), `weights.safetensors` (the same network, for gradient work) and
`manifest.json`. Loading refuses a bundle, with a `BundleError` naming the problem, when:
  - a file listed in the manifest is missing or its sha256 differs (the message names the file);
  - the manifest breaks the schema (the message names the field, e.g. `layers[1].baselines`);
  - the ONNX graph's inputs/outputs do not match the manifest, or its outputs differ from the torch model's on a
    small random input by more than the tolerance below.

Manifest schema (schema_version 1), every key required:
    schema_version  int, == 1
    name            str, non-empty
    version         int >= 1
    architecture    str, a zoo architecture
    classes         list[str], >= 2, unique
    input           {size: int > 0, channels: int > 0, mean: [float]*channels, std: [float > 0]*channels,
                     value_range: [lo, hi] floats with lo < hi}
    layers          list of {name: str, units: int > 0, baselines: [float]*units,
                     units_info: [{index: int (== position), label: str ("" = unlabelled), category: str,
                                   iou: float in [0,1], detector: bool}]*units}
    cooccurrence    {concept: {class: float}}: P(concept present in an image | image of class), from dissection
    metrics         dict (clean/robust accuracy, interpretability, consistency; free-form JSON values)
    provenance      dict (config, lambda, epsilon, seed, git_commit; free-form JSON values)
    files           {relative file name: sha256 hex} for every file of the bundle except manifest.json;
                     must list model.onnx and weights.safetensors
Optional (older v1 manifests without it keep loading; the trace then flags on plausibility alone):
    adversarial_detector  {kind, layer, threshold, target_fpr, center, scale, file, calibration[,
                     class_thresholds]}: the detector behind the trace's adversarial_score and its calibrated
                     thresholds (handlers/detector.py); `file` (listed in `files`) holds the Mahalanobis class
                     means and precision; without `class_thresholds` every class is flagged above `threshold`
    plausibility_calibration  {quantiles: {class: [101 numbers]}, images, data}: each class's clean raw
                     plausibility quantiles, against which the trace's plausibility is served
                     (handlers/plausibility.py); without it the raw plausibility is served
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from .errors import BundleError, ConceptLensError
from .zoo import ImageClassifier, build_model, is_arch, list_archs, load_weights

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
INPUT_NAME = "images"
LOGITS_NAME = "logits"
# ONNX-vs-torch check: every output must satisfy max|onnx - torch| <= ATOL + RTOL * max|torch| (float32, same
# input). Observed differences on CPU are ~1e-6 relative; the slack covers CUDA EP kernels and deeper nets.
ATOL = 1e-4
RTOL = 1e-3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UnitInfo:
    """What dissection found for one unit (channel): its best concept overall and whether it is a detector."""

    index: int
    label: str = ""
    category: str = ""
    iou: float = 0.0
    detector: bool = False


@dataclass(frozen=True)
class LayerInfo:
    """A traced layer: its unit count, per-unit baselines b_k (mean activation; 0 if unknown) and unit labels."""

    name: str
    units: int
    baselines: list[float]
    units_info: list[UnitInfo]


@dataclass(frozen=True)
class InputSpec:
    size: int
    channels: int
    mean: list[float]
    std: list[float]
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json (see the module docstring for the schema)."""

    schema_version: int
    name: str
    version: int
    architecture: str
    classes: list[str]
    input: InputSpec
    layers: list[LayerInfo]
    cooccurrence: dict[str, dict[str, float]]
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    files: dict[str, str]
    adversarial_detector: dict[str, Any] | None = None  # optional; see handlers/detector.py
    plausibility_calibration: dict[str, Any] | None = None  # optional; see handlers/plausibility.py

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        from .errors import UnknownName

        raise UnknownName("layer", name, [info.name for info in self.layers])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("adversarial_detector", "plausibility_calibration"):
            if data[key] is None:  # absent, as in manifests written before it existed
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse and validate; raises BundleError naming the first bad field."""
        return _parse_manifest(data)


class Bundle:
    """A validated bundle on disk. `torch_model()` rebuilds the network from the manifest and safetensors."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def onnx_path(self) -> Path:
        return self.root / ONNX_FILE

    @property
    def weights_path(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.manifest.layers]

    def torch_model(self, device: str | torch.device = "cpu") -> ImageClassifier:
        """A fresh ImageClassifier in eval mode on `device` with the bundle's weights."""
        m = self.manifest
        try:
            model = build_model(
                m.architecture, m.classes, input_size=m.input.size, mean=m.input.mean, std=m.input.std
            ).to(device)
            load_weights(model, self.weights_path)
        except ConceptLensError as err:
            raise BundleError(f"{self.root}: {WEIGHTS_FILE} does not load: {err}") from err
        return model.eval()

    def onnx_session(self, providers: Sequence[str] | None = None) -> Any:
        """An onnxruntime InferenceSession over model.onnx (CUDA EP first when CUDA is available)."""
        import onnxruntime as ort

        return ort.InferenceSession(str(self.onnx_path), providers=list(providers or ort_providers()))

    def __repr__(self) -> str:
        return f"Bundle({self.manifest.name!r} v{self.manifest.version} at {self.root})"


def ort_providers() -> list[str]:
    """ONNX Runtime execution providers: CUDA then CPU when torch sees a GPU and ORT has the CUDA EP, else CPU."""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(path: str | Path, *, verify_onnx: bool = True) -> Bundle:
    """Load and check the bundle at `path` (a `<name>/<version>/` directory).

    Checks, in order: manifest.json exists and parses; schema; every listed file exists and matches its sha256;
    the ONNX graph's input/output names match the manifest; the weights load into the named architecture; and,
    with `verify_onnx`, ONNX Runtime and torch agree on a random input within ATOL/RTOL. Raises BundleError.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: missing file {MANIFEST}")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{root}: {MANIFEST} is not valid JSON: {err}") from err
    try:
        manifest = _parse_manifest(data)
    except BundleError as err:
        raise BundleError(f"{root}: {err}") from None
    verify_files(root, manifest)
    bundle = Bundle(root, manifest)
    _check_onnx_signature(bundle)
    model = bundle.torch_model("cpu")
    if verify_onnx:
        size, channels = manifest.input.size, manifest.input.channels
        images = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        try:
            check_onnx_matches(model, bundle.layer_names, bundle.onnx_path, images)
        except BundleError as err:
            raise BundleError(f"{root}: {err}") from None
    log.info("loaded %r", bundle)
    return bundle


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every file in `manifest.files` exists under `root` and has the recorded sha256."""
    for name, expected in manifest.files.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"{root}: missing file {name}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"{root}: sha256 mismatch for {name}: manifest {expected[:12]}…, file {actual[:12]}…")


def onnx_output_names(layers: Sequence[str]) -> list[str]:
    return [LOGITS_NAME, *layers]


def run_onnx(onnx_path: Path, images: torch.Tensor, providers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=list(providers or ort_providers()))
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {INPUT_NAME: images.detach().cpu().numpy().astype(np.float32)})
    return dict(zip(names, outs, strict=True))


def torch_outputs(model: torch.nn.Module, layers: Sequence[str], images: torch.Tensor) -> dict[str, np.ndarray]:
    """Logits and traced-layer activations of the torch model, as the ONNX graph should produce them."""
    from .hooks import capture
    from .modes import eval_mode

    with eval_mode(model), torch.no_grad(), capture(model, layers, detach=True) as acts:
        logits = model(images)
        outs = {LOGITS_NAME: logits, **{name: acts[name] for name in layers}}
    return {k: v.float().cpu().numpy() for k, v in outs.items()}


def compare_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per output; BundleError when one exceeds ATOL + RTOL * max|expected| or is missing."""
    errors: dict[str, float] = {}
    for name, ref in expected.items():
        if name not in actual:
            raise BundleError(f"ONNX output {name!r} missing")
        got = actual[name]
        if got.shape != ref.shape:
            raise BundleError(f"ONNX output {name!r} has shape {got.shape}, torch gives {ref.shape}")
        err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        allowed = ATOL + RTOL * (float(np.max(np.abs(ref))) if ref.size else 0.0)
        if not math.isfinite(err) or err > allowed:
            raise BundleError(f"ONNX output {name!r} differs from torch by {err:.3g} (allowed {allowed:.3g})")
        errors[name] = err
    return errors


def check_onnx_matches(
    model: torch.nn.Module, layers: Sequence[str], onnx_path: Path, images: torch.Tensor
) -> dict[str, float]:
    """Run both backends on `images`; return max abs error per output or raise BundleError."""
    ref = torch_outputs(model, layers, images.to(next(model.parameters()).device))
    got = run_onnx(onnx_path, images)
    return compare_outputs(ref, got)


def _check_onnx_signature(bundle: Bundle) -> None:
    import onnx

    try:
        graph = onnx.load(str(bundle.onnx_path), load_external_data=False).graph
    except Exception as err:  # onnx raises DecodeError and friends without a common base
        raise BundleError(f"{bundle.root}: {ONNX_FILE} does not parse: {err}") from err
    inputs = [i.name for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME]:
        raise BundleError(f"{bundle.root}: {ONNX_FILE} inputs are {inputs}, expected [{INPUT_NAME!r}]")
    expected = onnx_output_names(bundle.layer_names)
    if outputs != expected:
        raise BundleError(f"{bundle.root}: {ONNX_FILE} outputs are {outputs}, manifest says {expected}")


# --- schema ------------------------------------------------------------------------------------------------


def _bad(field_name: str, problem: str) -> BundleError:
    return BundleError(f"manifest field {field_name!r}: {problem}")


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _bad(f"{where}{key}", "missing")
    return obj[key]


def _typed(value: Any, kinds: type | tuple[type, ...], name: str, what: str) -> Any:
    # bool is an int in Python; a manifest that says `true` for a count is wrong.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _bad(name, f"expected {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise _bad(name, f"expected {what}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, name: str) -> float:
    value = float(_typed(value, (int, float), name, "a number"))
    if not math.isfinite(value):
        raise _bad(name, f"must be finite, got {value}")
    return value


def _numbers(value: Any, name: str, length: int | None = None) -> list[float]:
    items = _typed(value, list, name, "a list of numbers")
    if length is not None and len(items) != length:
        raise _bad(name, f"expected {length} values, got {len(items)}")
    return [_number(v, f"{name}[{i}]") for i, v in enumerate(items)]


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise _bad(name, problem)


def _parse_manifest(data: Any) -> Manifest:
    _typed(data, dict, "<root>", "a JSON object")
    schema = _typed(_get(data, "schema_version", ""), int, "schema_version", "an integer")
    _check(schema == SCHEMA_VERSION, "schema_version", f"unsupported {schema} (this build reads {SCHEMA_VERSION})")
    name = _typed(_get(data, "name", ""), str, "name", "a string")
    _check(bool(name.strip()), "name", "must not be empty")
    version = _typed(_get(data, "version", ""), int, "version", "an integer")
    _check(version >= 1, "version", f"must be >= 1, got {version}")
    arch = _typed(_get(data, "architecture", ""), str, "architecture", "a string")
    _check(is_arch(arch), "architecture", f"unknown {arch!r}; valid: {', '.join(list_archs())}, timm:<name>")
    classes = _typed(_get(data, "classes", ""), list, "classes", "a list of strings")
    for i, c in enumerate(classes):
        _typed(c, str, f"classes[{i}]", "a string")
    _check(len(classes) >= 2, "classes", f"need at least 2, got {len(classes)}")
    _check(len(set(classes)) == len(classes), "classes", "names must be unique")
    spec = _parse_input(_typed(_get(data, "input", ""), dict, "input", "an object"))
    layers_raw = _typed(_get(data, "layers", ""), list, "layers", "a list")
    layers = [_parse_layer(layer, f"layers[{i}]") for i, layer in enumerate(layers_raw)]
    names = [layer.name for layer in layers]
    _check(len(set(names)) == len(names), "layers", "layer names must be unique")
    _check(LOGITS_NAME not in names and INPUT_NAME not in names, "layers", "a layer may not be called logits/images")
    cooc_raw = _typed(_get(data, "cooccurrence", ""), dict, "cooccurrence", "an object")
    cooccurrence: dict[str, dict[str, float]] = {}
    for concept, row in cooc_raw.items():
        row = _typed(row, dict, f"cooccurrence.{concept}", "an object of class -> number")
        cooccurrence[concept] = {cls: _number(v, f"cooccurrence.{concept}.{cls}") for cls, v in row.items()}
    metrics = _typed(_get(data, "metrics", ""), dict, "metrics", "an object")
    provenance = _typed(_get(data, "provenance", ""), dict, "provenance", "an object")
    files = _typed(_get(data, "files", ""), dict, "files", "an object of file -> sha256")
    for fname, digest in files.items():
        _check(_safe_name(fname), f"files.{fname}", "must be a relative path inside the bundle")
        _check(fname != MANIFEST, f"files.{fname}", "the manifest cannot list its own hash")
        _check(isinstance(digest, str) and bool(_SHA256.match(digest)), f"files.{fname}", "expected a sha256 hex")
    for required in (ONNX_FILE, WEIGHTS_FILE):
        _check(required in files, f"files.{required}", "missing")
    detector = data.get("adversarial_detector")
    if detector is not None:
        from .detector import parse_entry

        detector = parse_entry(detector, len(classes), names, files)
    plausibility = data.get("plausibility_calibration")
    if plausibility is not None:
        from . import plausibility as P

        plausibility = P.parse_entry(plausibility, classes)
    return Manifest(schema, name, version, arch, list(classes), spec, layers, cooccurrence, metrics, provenance,
                    dict(files), detector, plausibility)


def _parse_input(raw: Mapping[str, Any]) -> InputSpec:
    size = _typed(_get(raw, "size", "input."), int, "input.size", "an integer")
    _check(size > 0, "input.size", f"must be > 0, got {size}")
    channels = _typed(_get(raw, "channels", "input."), int, "input.channels", "an integer")
    _check(channels > 0, "input.channels", f"must be > 0, got {channels}")
    mean = _numbers(_get(raw, "mean", "input."), "input.mean", channels)
    std = _numbers(_get(raw, "std", "input."), "input.std", channels)
    _check(all(s > 0 for s in std), "input.std", "values must be > 0")
    value_range = _numbers(_get(raw, "value_range", "input."), "input.value_range", 2)
    _check(value_range[0] < value_range[1], "input.value_range", "need lo < hi")
    return InputSpec(size, channels, mean, std, value_range)


def _parse_layer(raw: Any, where: str) -> LayerInfo:
    raw = _typed(raw, dict, where, "an object")
    name = _typed(_get(raw, "name", f"{where}."), str, f"{where}.name", "a string")
    _check(bool(name), f"{where}.name", "must not be empty")
    units = _typed(_get(raw, "units", f"{where}."), int, f"{where}.units", "an integer")
    _check(units > 0, f"{where}.units", f"must be > 0, got {units}")
    baselines = _numbers(_get(raw, "baselines", f"{where}."), f"{where}.baselines", units)
    infos_raw = _typed(_get(raw, "units_info", f"{where}."), list, f"{where}.units_info", "a list")
    _check(len(infos_raw) == units, f"{where}.units_info", f"expected {units} entries, got {len(infos_raw)}")
    infos = []
    for i, info in enumerate(infos_raw):
        at = f"{where}.units_info[{i}]"
        info = _typed(info, dict, at, "an object")
        index = _typed(_get(info, "index", f"{at}."), int, f"{at}.index", "an integer")
        _check(index == i, f"{at}.index", f"expected {i}, got {index}")
        label = _typed(_get(info, "label", f"{at}."), str, f"{at}.label", "a string")
        category = _typed(_get(info, "category", f"{at}."), str, f"{at}.category", "a string")
        iou = _number(_get(info, "iou", f"{at}."), f"{at}.iou")
        _check(0.0 <= iou <= 1.0, f"{at}.iou", f"must be in [0, 1], got {iou}")
        detector = _typed(_get(info, "detector", f"{at}."), bool, f"{at}.detector", "a boolean")
        infos.append(UnitInfo(index, label, category, iou, detector))
    return LayerInfo(name, units, baselines, infos)


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def manifest_dict(
    *,
    name: str,
    version: int,
    architecture: str,
    classes: Sequence[str],
    input_spec: InputSpec,
    layers: Sequence[LayerInfo],
    cooccurrence: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, Any],
    provenance: Mapping[str, Any],
    files: Mapping[str, str],
    adversarial_detector: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object export writes; round-trips through `Manifest.from_json`."""
    manifest = Manifest(SCHEMA_VERSION, name, int(version), architecture, list(classes), input_spec, list(layers),
                        {c: dict(row) for c, row in cooccurrence.items()}, dict(metrics), dict(provenance),
                        dict(files), dict(adversarial_detector) if adversarial_detector else None)
    return manifest.to_json()

