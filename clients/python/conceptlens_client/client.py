"""The typed client. Every method returns the response message; gRPC failures become `ServiceError` with the
status code name and the server's message (which names the field and the problem)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image as PILImage

from .v1 import conceptlens_service_pb2 as pb
from .v1 import conceptlens_service_pb2_grpc as pb_grpc

ImageLike = str | Path | bytes | np.ndarray | PILImage.Image | pb.Image
SERVICE = pb.DESCRIPTOR.services_by_name["ConceptLens"].full_name


def retry_service_config(attempts: int = 4) -> str:
    """The gRPC service config (JSON) the client uses: calls refused for overload (RESOURCE_EXHAUSTED) or while
    a server restarts (UNAVAILABLE) are retried up to `attempts` times in all, with exponential backoff and
    jitter, within the call's own deadline. The server's `grpc-retry-pushback-ms` trailer overrides the backoff:
    it says when to retry, or (-1) that the refusal is final (a request over a work cap or the reply size). Retry
    throttling stops retrying while most calls fail, so retries cannot multiply an overload (gRFC A6)."""
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.05s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]},
        }],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    })


class ServiceError(Exception):
    """A call failed: `code` is the gRPC status code name (e.g. "INVALID_ARGUMENT"), `message` the details."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def to_image(item: ImageLike) -> pb.Image:
    """One request image: a file path or PNG/JPEG bytes are sent encoded; a numpy array (C, H, W) of uint8 or
    float32 in [0, 1] is sent as a raw tensor; a PIL image is sent as PNG."""
    if isinstance(item, pb.Image):
        return item
    if isinstance(item, str | Path):
        return pb.Image(encoded=Path(item).read_bytes())
    if isinstance(item, bytes):
        return pb.Image(encoded=item)
    if isinstance(item, PILImage.Image):
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    if isinstance(item, np.ndarray):
        dtypes = {np.dtype(np.uint8): pb.Tensor.UINT8, np.dtype(np.float32): pb.Tensor.FLOAT32}
        if item.dtype not in dtypes:
            raise TypeError(f"array images must be uint8 or float32, got {item.dtype}")
        data = np.ascontiguousarray(item, dtype=item.dtype.newbyteorder("<")).tobytes()
        return pb.Image(tensor=pb.Tensor(shape=list(item.shape), dtype=dtypes[item.dtype], data=data))
    raise TypeError(f"cannot send {type(item).__name__} as an image")


class Client:
    """A ConceptLens connection.

    `target` is host:port. TLS when `root_certificates` (PEM bytes of the CA) is given; add `private_key` and
    `certificate_chain` for mTLS. `token` adds `authorization: Bearer <token>` to every call. `timeout` is the
    default deadline in seconds. `attempts` > 1 retries overload and restart refusals (`retry_service_config`);
    1 turns retries off.
    """

    def __init__(self, target: str = "localhost:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, timeout: float = 60.0,
                 max_message_bytes: int = 64 * 1024 * 1024, server_name: str | None = None,
                 attempts: int = 4) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if attempts > 1:
            options.append(("grpc.service_config", retry_service_config(attempts)))
        else:
            options.append(("grpc.enable_retries", 0))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ConceptLensStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ServiceError(err.code().name, err.details() or "") from None

    def models(self) -> list[pb.Model]:
        """Every served model (latest version of each)."""
        return list(self._call("ListModels", pb.ListModelsRequest(), None).models)

    def get_model(self, model: str = "", version: int = 0, *, name: str = "") -> pb.Model:
        """One model version, named by `model` (+ `version`) or by its resource `name` (`Model.name`). Wherever a
        call takes a model, the short name and the resource names `models/NAME[/versions/V]` mean the same."""
        return self._call("GetModel", pb.GetModelRequest(model=model, version=version, name=name), None)

    def predict(self, images: Iterable[ImageLike], model: str, *, version: int = 0, top_k: int = 0,
                timeout: float | None = None) -> pb.PredictResponse:
        request = pb.PredictRequest(model=model, version=version, images=[to_image(i) for i in images], top_k=top_k)
        return self._call("Predict", request, timeout)

    def explain(self, images: Iterable[ImageLike], model: str, *, version: int = 0, top_k_classes: int = 0,
                top_k_units: int = 0, layers: Sequence[str] = (), target_class: str = "",
                include_maps: bool = False, map_size: int = 0, depth: int = 0, candidates: int = 0,
                timeout: float | None = None) -> pb.ExplainResponse:
        request = pb.ExplainRequest(
            model=model, version=version, images=[to_image(i) for i in images], top_k_classes=top_k_classes,
            top_k_units=top_k_units, layers=list(layers), target_class=target_class, include_maps=include_maps,
            map_size=map_size, depth=depth, candidates=candidates)
        return self._call("Explain", request, timeout)

    def probe(self, images: Iterable[ImageLike], model: str, *, attack: str = "pgd", norm: str = "linf",
              epsilon: float = 0.0, epsilon_range: tuple[float, float] | None = None, steps: int = 0,
              restarts: int = 0, step_size: float = 0.0, tolerance: float = 0.0, target_class: str = "",
              ensemble_models: Sequence[str] = (), seed: int | None = None, random_start: bool | None = None,
              layers: Sequence[str] = (), top_k_units: int = 0, return_adversarial: bool = False, version: int = 0,
              timeout: float | None = None) -> pb.ProbeResponse:
        """Attack `images` on the server: at a fixed `epsilon`, or search each image's minimal flipping ε in
        `epsilon_range` (low, high) to `tolerance`. `attack`: fgsm, pgd, mifgsm, ghost-ensemble or square;
        `norm`: linf or l2. 0 / empty values take the server's defaults (see AttackSpec in the proto)."""
        kinds = {"fgsm": pb.AttackSpec.FGSM, "pgd": pb.AttackSpec.PGD, "mifgsm": pb.AttackSpec.MIFGSM,
                 "ghost-ensemble": pb.AttackSpec.GHOST_ENSEMBLE, "square": pb.AttackSpec.SQUARE}
        norms = {"linf": pb.AttackSpec.LINF, "l2": pb.AttackSpec.L2}
        if attack not in kinds:
            raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(kinds)}")
        if norm not in norms:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(norms)}")
        spec = pb.AttackSpec(kind=kinds[attack], norm=norms[norm], epsilon=epsilon, steps=steps, restarts=restarts,
                             step_size=step_size, tolerance=tolerance, target_class=target_class,
                             ensemble_models=list(ensemble_models))
        if epsilon_range is not None:
            spec.epsilon_min, spec.epsilon_max = epsilon_range
        if seed is not None:
            spec.seed = seed
        if random_start is not None:
            spec.random_start = random_start
        request = pb.ProbeRequest(model=model, version=version, images=[to_image(i) for i in images], attack=spec,
                                  return_adversarial=return_adversarial, top_k_units=top_k_units, layers=list(layers))
        return self._call("Probe", request, timeout)
