"""TorchServe adapter: serve a ConceptLens bundle from a `.mar` archive with prediction + trace in the response,
for teams whose serving platform is TorchServe rather than the ConceptLens gRPC server.

Archive the bundle's three files with this module as the handler (deploy/README.md, "TorchServe"):

    torch-model-archiver --model-name small --version 1.0 --handler handlers/torchserve_handler.py \
        --extra-files BUNDLE/model.onnx,BUNDLE/weights.safetensors,BUNDLE/manifest.json --export-path model_store

TorchServe unpacks the archive into `model_dir`; `initialize` loads it with `load_bundle` (hashes, schema and the
ONNX-vs-torch check, exactly as the gRPC server does) and builds the same `ModelRuntime`. Each request body is
one PNG or JPEG image; the answer is JSON: {"model", "version", "prediction": {"classes": [...]},
"trace": {"target", "layers", "plausibility", "adversarial", "adversarial_score", "summary"}}: the field names
of the proto's Explanation; TorchServe's /explanations endpoint answers the same. A request that is not a
decodable image gets HTTP 400 with the reason; the others in its batch are answered normally.

TorchServe is not a dependency of ConceptLens: the base class is imported when available, so this module (and
its pure helpers) import without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.handlers import imaging
from conceptlens.handlers.errors import InvalidInput

try:  # present inside TorchServe's model workers
    from ts.torch_handler.base_handler import BaseHandler
except ImportError:  # torchserve not installed: keep the module importable

    class BaseHandler:  # type: ignore[no-redef]
        """Stand-in with BaseHandler's attributes, so the class below still defines without torchserve."""

        def __init__(self) -> None:
            self.initialized = False
            self.context: Any = None
            self.manifest: Any = None


log = logging.getLogger(__name__)

TOP_K_CLASSES = 5
TOP_K_UNITS = 5
MAX_PIXELS = 4096 * 4096  # per image (one image per request here), as the gRPC server's default limit


class ConceptLensHandler(BaseHandler):
    """TorchServe handler: PNG/JPEG in, ConceptLens prediction and influence trace out (one JSON per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime: Any = None
        self.threshold = 0.5

    def initialize(self, context: Any) -> None:
        """Load and verify the bundle unpacked into TorchServe's model_dir."""
        from conceptlens.handlers.backends import ModelRuntime
        from conceptlens.handlers.bundle import load_bundle

        self.context = context
        self.manifest = context.manifest
        model_dir = Path(context.system_properties["model_dir"])
        bundle = load_bundle(model_dir)
        self.runtime = ModelRuntime(bundle)
        self.initialized = True
        log.info("ConceptLens handler serving %r from %s", self.runtime, model_dir)

    def preprocess(self, data: Sequence[dict[str, Any]]) -> list[np.ndarray | InvalidInput]:
        """Each request's image as (C, size, size) float32 in [0, 1], or the InvalidInput that refused it."""
        out: list[np.ndarray | InvalidInput] = []
        for i, row in enumerate(data):
            body = row.get("data") if row.get("data") is not None else row.get("body")
            try:
                out.append(decode_image(body, self.runtime.input_size, self.runtime.channels, field=f"request[{i}]"))
            except InvalidInput as err:
                out.append(err)
        return out

    def inference(self, data: list[np.ndarray | InvalidInput], *args: Any, **kwargs: Any) -> list[dict | InvalidInput]:
        """One ONNX pass over the batch's good images, then each image's trace."""
        from conceptlens.handlers.trace import TraceOptions, trace_image

        good = [i for i, item in enumerate(data) if isinstance(item, np.ndarray)]
        results: list[dict | InvalidInput] = [item for item in data]  # errors stay in place
        if not good:
            return results
        runtime = self.runtime
        out = runtime.forward(np.stack([data[i] for i in good]))
        layers = tuple(runtime.layer_order)
        units = min(runtime.layer(name).units for name in layers)
        options = TraceOptions(layers=layers, top_k_units=min(TOP_K_UNITS, units))
        for row, i in enumerate(good):
            acts = {layer: out.activations[layer][row] for layer in layers}
            trace = trace_image(runtime, data[i], out.logits[row], acts, options,
                                plausibility_threshold=self.threshold)
            results[i] = explanation(runtime, out.logits[row], trace)
        return results

    def explain_handle(self, data_preprocess: list[np.ndarray | InvalidInput], raw_data: Any) -> list[dict]:
        """TorchServe's /explanations API: the same prediction + trace (our explanation is the trace; the base
        class would call Captum through `get_insights`)."""
        return self.postprocess(self.inference(data_preprocess))

    def postprocess(self, data: list[dict | InvalidInput]) -> list[dict]:
        """JSON per request; refused ones get HTTP 400 with the reason."""
        answers = []
        for i, item in enumerate(data):
            if isinstance(item, InvalidInput):
                if self.context is not None and hasattr(self.context, "set_response_status"):
                    self.context.set_response_status(400, str(item), i)
                answers.append({"error": str(item)})
            else:
                answers.append(item)
        return answers


def decode_image(body: Any, size: int, channels: int, *, field: str) -> np.ndarray:
    """PNG/JPEG bytes -> (channels, size, size) float32 in [0, 1], with the gRPC server's decoder and checks
    (header size before decoding, 16-bit scaling, bilinear resize): `conceptlens.handlers.imaging`."""
    if not isinstance(body, bytes | bytearray):
        raise InvalidInput(field, "the request body must be PNG or JPEG image bytes")
    return imaging.decode_image(body, size, channels, max_pixels=MAX_PIXELS, field=field)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _score(index: int, classes: Sequence[str], logits: np.ndarray, probs: np.ndarray) -> dict:
    return {"index": int(index), "label": classes[index], "logit": float(logits[index]),
            "probability": float(probs[index])}


def _unit(u: Any) -> dict:
    return {"layer": u.layer, "unit": u.unit, "delta": u.delta, "exact": u.exact, "activation": u.activation,
            "baseline": u.baseline, "concept": u.concept, "category": u.category, "iou": u.iou,
            "detector": u.detector, "contributors": [_unit(c) for c in u.contributors]}


def explanation(runtime: Any, logits: np.ndarray, trace: Any) -> dict:
    """One image's prediction and trace as JSON-ready data (the proto's Explanation field names)."""
    classes = runtime.classes
    logits = logits.astype(np.float64)
    probs = _softmax(logits)
    order = np.argsort(-logits, kind="stable")[:TOP_K_CLASSES]
    return {
        "model": runtime.name,
        "version": runtime.version,
        "prediction": {"classes": [_score(i, classes, logits, probs) for i in order]},
        "trace": {
            "target": _score(trace.target, classes, logits, probs),
            "layers": [{"layer": lt.layer, "share": lt.share, "method": lt.method,
                        "units": [_unit(u) for u in lt.units]} for lt in trace.layers],
            "plausibility": trace.plausibility,
            "adversarial": trace.adversarial,
            "adversarial_score": trace.adversarial_score,
            "summary": trace.summary,
        },
    }
