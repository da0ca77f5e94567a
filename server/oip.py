"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) on the ConceptLens server, so
callers already written against Triton or KServe (tritonclient, kserve's client) work unchanged.

Like the ConceptLens servicer it is thin: it checks the tensor, then hands the images to the very same model
repository and Predict batcher, so ModelInfer and Predict requests share batches, queues and limits. The model
takes one input, `images` (FP32 in [0, 1], or UINT8 divided by 255; shape [N, C, size, size]) and gives one
output, `logits` (FP32 [N, K]). Explanations stay on the ConceptLens API: this protocol has no place for them.

Calls are counted in `conceptlens_requests_total` / `conceptlens_request_duration_seconds` under their OIP method
name (ServerLive, ModelInfer, ...): the metrics interceptor only measures the ConceptLens service.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from conceptlens import __version__
from conceptlens.handlers import imaging
from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2 as pb
from conceptlens_client.kserve.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

from . import errors
from .metrics import Metrics

if TYPE_CHECKING:
    from .repository import ModelRepository
    from .servicer import ConceptLensServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INPUT = "images"
OUTPUT = "logits"
PLATFORM = "onnxruntime_onnx"
_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("<u1")}
_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only, below 2**63


def _measured(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Count the call and time it, whatever its outcome (the code comes from the same error table)."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: OipServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        name = getattr(request, "model_name", "") or getattr(request, "name", "")
        model = name if name in self.repo.names() else ("" if not name else "unknown")
        code = grpc.StatusCode.OK
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:  # the caller went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = errors.status_for(err)
            await errors.abort(context, err, method)
        finally:
            self.metrics.requests.labels(method, model, code.name).inc()
            self.metrics.latency.labels(method, model).observe(time.perf_counter() - start)

    return wrapper


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 endpoints over the ConceptLens repository and Predict batcher."""

    def __init__(self, repository: ModelRepository, servicer: ConceptLensServicer, metrics: Metrics) -> None:
        self.repo = repository
        self.predict = servicer
        self.metrics = metrics

    @_measured
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_measured
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.repo.names()))

    @_measured
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="conceptlens", version=__version__, extensions=[])

    @_measured
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        version = _version(request.version, "version")
        try:
            self.repo.resolve(_name(request.name, "name"), version)
        except UnknownName:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_measured
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        runtime = self.repo.resolve(_name(request.name, "name"), _version(request.version, "version"))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        size, channels = runtime.input_size, runtime.channels
        return pb.ModelMetadataResponse(
            name=runtime.name, versions=[str(v) for v in self.repo.versions(runtime.name)], platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, channels, size, size])],
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, len(runtime.classes)])])

    @_measured
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        runtime = self.repo.resolve(_name(request.model_name, "model_name"),
                                    _version(request.model_version, "model_version"))
        for i, wanted in enumerate(request.outputs):
            if wanted.name != OUTPUT:
                raise InvalidInput(f"outputs[{i}].name", f"unknown output {wanted.name!r}; valid: {OUTPUT}")
        images = decode_input(request, (runtime.channels, runtime.input_size, runtime.input_size),
                              self.predict.limits.max_images)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        logits = await self.predict.batcher(runtime.name, "predict").submit(runtime, images, len(images), deadline)
        logits = np.ascontiguousarray(logits, dtype="<f4")
        out = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=list(logits.shape))
        return pb.ModelInferResponse(model_name=runtime.name, model_version=str(runtime.version), id=request.id,
                                     outputs=[out], raw_output_contents=[logits.tobytes()])

    async def RepositoryModelLoad(self, request, context):
        await errors.abort(context, NotImplementedError(
            "RepositoryModelLoad: models load from the watched repository; copy a bundle into <name>/<version>/"))

    async def RepositoryModelUnload(self, request, context):
        await errors.abort(context, NotImplementedError(
            "RepositoryModelUnload: remove the model's <name>/<version>/ directory instead"))


def decode_input(request: pb.ModelInferRequest, image_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """The request's one input tensor as (N, C, H, W) float32 in [0, 1]; InvalidInput names what is wrong."""
    if len(request.inputs) != 1:
        raise InvalidInput("inputs", f"expected exactly one input tensor {INPUT!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT:
        raise InvalidInput("inputs[0].name", f"unknown input {tensor.name!r}; valid: {INPUT}")
    if tensor.datatype not in _DTYPES:
        raise InvalidInput("inputs[0].datatype", f"must be FP32 or UINT8, got {tensor.datatype!r}")
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != image_shape:
        raise InvalidInput("inputs[0].shape", f"must be [N, {', '.join(map(str, image_shape))}], got {list(shape)}")
    if not 1 <= shape[0] <= max_images:
        raise InvalidInput("inputs[0].shape", f"batch of {shape[0]} images; this server takes 1..{max_images}")
    dtype = _DTYPES[tensor.datatype]
    count = int(np.prod(shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput("raw_input_contents", "give one entry per input (one input here)")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput("raw_input_contents[0]",
                               f"holds {len(raw)} bytes; shape and datatype need {count * dtype.itemsize}")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        typed = getattr(tensor.contents, _CONTENTS[tensor.datatype])
        if len(typed) != count:
            raise InvalidInput(f"inputs[0].contents.{_CONTENTS[tensor.datatype]}",
                               f"holds {len(typed)} values; shape needs {count}")
        values = np.asarray(typed, dtype=np.float32 if dtype.kind == "f" else np.int64)
        if dtype.kind == "u" and (values.min() < 0 or values.max() > 255):
            raise InvalidInput("inputs[0].contents.uint_contents", "UINT8 values must lie in 0..255")
    # the one raw-pixel conversion of the server (conceptlens.handlers.imaging): typed UINT8 contents were
    # range-checked above, so the cast is exact
    pixels = imaging.unit_pixels(values.reshape(shape).astype(dtype, copy=False), ["inputs[0]"] * shape[0])
    return pixels if pixels.flags.writeable else pixels.copy()


def _name(value: str, field: str) -> str:
    if not value:
        raise InvalidInput(field, "model name is required")
    return value


def _version(value: str, field: str) -> int:
    """OIP versions are decimal strings; empty means the latest (0 for the repository)."""
    if not value:
        return 0
    if not _VERSION.fullmatch(value) or int(value) < 1:  # not str.isdigit: it takes "²", which int() refuses
        raise InvalidInput(field, f"must be a positive decimal version number, got {value[:32]!r}")
    return int(value)
