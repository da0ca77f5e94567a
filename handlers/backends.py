"""Model runtimes for serving: one ONNX Runtime session per bundle for forward passes (CUDA EP when a GPU is
present, else CPU; intra-op threads configurable) and the torch model rebuilt from the bundle's safetensors for
gradient work (hidden-layer tracing, probes), on CUDA when present.

A `ModelRuntime` is immutable once built; hot reload builds a new one and swaps it in.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .bundle import INPUT_NAME, LOGITS_NAME, Bundle, LayerInfo, ort_providers
from .errors import UnknownName
from .zoo import ImageClassifier, arch_spec, resolve_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forward:
    """One batch's ONNX outputs: logits (N, K) and each traced layer's activations (N, C, h, w)."""

    logits: np.ndarray
    activations: dict[str, np.ndarray]
    seconds: float


@dataclass(frozen=True)
class LinearHead:
    """The closed form behind exact last-layer influence: logits = W · GAP(A) + bias."""

    layer: str
    weight: np.ndarray  # (K, C)
    bias: np.ndarray  # (K,)


class OnnxBackend:
    """An ONNX Runtime session over a bundle's model.onnx. `run` is thread-safe (ORT sessions are)."""

    def __init__(self, bundle: Bundle, *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.providers = ort_providers()
        self.session = ort.InferenceSession(str(bundle.onnx_path), sess_options=options, providers=self.providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> Forward:
        start = time.perf_counter()
        outs = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        named = dict(zip(self.output_names, outs, strict=True))
        logits = named.pop(LOGITS_NAME)
        return Forward(logits, named, time.perf_counter() - start)


class ModelRuntime:
    """Everything needed to serve one bundle version: manifest, ONNX session, torch model, closed-form head."""

    def __init__(self, bundle: Bundle, *, threads: int = 0, device: str | torch.device | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.name = self.manifest.name
        self.version = self.manifest.version
        self.classes = list(self.manifest.classes)
        self.layers: dict[str, LayerInfo] = {info.name: info for info in self.manifest.layers}
        self.layer_order = [info.name for info in self.manifest.layers]
        self.onnx = OnnxBackend(bundle, threads=threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.torch_model: ImageClassifier = bundle.torch_model(self.device)
        # Gradient work mutates nothing but hooks; one lock keeps concurrent traces from seeing each other's hooks.
        self.torch_lock = threading.Lock()
        self.head = _linear_head(self.torch_model, self.layers)
        self.baselines = {name: np.asarray(info.baselines, dtype=np.float32) for name, info in self.layers.items()}

    @property
    def input_size(self) -> int:
        return self.manifest.input.size

    @property
    def channels(self) -> int:
        return self.manifest.input.channels

    def layer(self, name: str) -> LayerInfo:
        if name not in self.layers:
            raise UnknownName("layer", name, self.layer_order)
        return self.layers[name]

    def forward(self, images: np.ndarray) -> Forward:
        return self.onnx.run(images)

    def __repr__(self) -> str:
        return f"ModelRuntime({self.name!r} v{self.version}, {self.onnx.providers[0]}, torch on {self.device})"


def _linear_head(model: ImageClassifier, layers: dict[str, LayerInfo]) -> LinearHead | None:
    """The head as (W, b) when the architecture's last layer is traced and feeds GAP + one linear layer whose
    inputs are exactly that layer's channels (resnets, small_cnn); None otherwise (vgg, mobilenet: their last
    conv layer takes the hidden-layer path)."""
    spec = arch_spec(model.arch)
    if not spec.head or spec.last_layer not in layers:  # "": head not verified as pooling + linear
        return None
    head = resolve_layer(model, spec.head)
    if not isinstance(head, nn.Linear) or head.in_features != layers[spec.last_layer].units:
        return None
    weight = head.weight.detach().float().cpu().numpy()
    bias = head.bias.detach().float().cpu().numpy() if head.bias is not None else np.zeros(weight.shape[0], np.float32)
    return LinearHead(spec.last_layer, weight, bias)
