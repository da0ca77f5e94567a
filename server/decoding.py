"""Turn request images (encoded PNG/JPEG bytes or raw little-endian tensors) into one float32 batch in [0, 1].

No torch here: numpy and Pillow only. Every refusal is an `InvalidInput` naming the field, e.g.
`images[2].encoded: header claims 20000x20000 pixels, over the 16777216-pixel limit`. The pixel work itself is
`conceptlens.handlers.imaging`, the one decoder shared with the Open Inference Protocol and TorchServe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from conceptlens.handlers import imaging
from conceptlens.handlers.errors import InvalidInput
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

_DTYPES = {pb.Tensor.UINT8: np.dtype("<u1"), pb.Tensor.FLOAT32: np.dtype("<f4")}


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: (channels, size, size) pixels."""

    size: int
    channels: int = 3


@dataclass
class Plan:
    """A request's images with every header and raw tensor checked: `out` holds the raw tensors already, and
    `pending` the (index, opened image) pairs whose pixels are still to decode into it."""

    out: np.ndarray
    pending: list[tuple[int, PILImage.Image]]

    def decode(self, index: int, img: PILImage.Image, spec: ImageSpec) -> None:
        """Decode one pending image into its row of `out` (the slow part: one call per image)."""
        self.out[index] = imaging.image_pixels(img, spec.size, spec.channels, field=f"images[{index}].encoded")


def plan_images(images: Sequence[pb.Image], spec: ImageSpec, *, max_pixels: int,
                max_request_pixels: int | None = None) -> Plan:
    """Check everything that can be checked without decoding a pixel: each encoded image's header against
    `max_pixels`, their sum against `max_request_pixels` (the request's decode budget), and every raw tensor
    (checked and converted together per dtype, as one array: per-image numpy calls on 3×32×32 pixels cost more
    in call overhead than in work, and this can run on the event loop)."""
    out = np.empty((len(images), spec.channels, spec.size, spec.size), dtype=np.float32)
    raw: dict[np.dtype, list[int]] = {}  # dtype -> indices of the tensor images holding it
    pending: list[tuple[int, PILImage.Image]] = []
    for i, image in enumerate(images):
        source = image.WhichOneof("source")
        if source == "encoded":
            pending.append((i, imaging.open_image(image.encoded, max_pixels=max_pixels, field=f"images[{i}].encoded")))
        elif source == "tensor":
            raw.setdefault(_tensor_dtype(image.tensor, spec, field=f"images[{i}].tensor"), []).append(i)
        else:
            raise InvalidInput(f"images[{i}]", "no image given: set `encoded` or `tensor`")
    if max_request_pixels is not None and pending:
        imaging.check_request_pixels([img.size[0] * img.size[1] for _, img in pending], max_request_pixels)
    for dtype, index in raw.items():
        block = _decode_raw([images[i].tensor.data for i in index], dtype, spec, [f"images[{i}].tensor" for i in index])
        if len(index) == len(images):
            return Plan(block.astype(np.float32, copy=not block.flags.writeable), [])
        out[index] = block
    return Plan(out, pending)


def decode_images(images: Sequence[pb.Image], spec: ImageSpec, *, max_pixels: int,
                  max_request_pixels: int | None = None) -> np.ndarray:
    """All request images as one (N, C, size, size) float32 array in [0, 1], decoded here and now (the server
    decodes PNG/JPEG on its `DecodePool` instead, which budgets and interleaves calls)."""
    plan = plan_images(images, spec, max_pixels=max_pixels, max_request_pixels=max_request_pixels)
    for index, img in plan.pending:
        plan.decode(index, img, spec)
    return plan.out


INLINE_BYTES = 1 << 20  # raw tensor bytes per request decoded on the event loop (about 0.1 ms of work)


def decode_inline(images: Sequence[pb.Image]) -> bool:
    """Whether decoding `images` is cheap enough to do on the event loop: raw tensors only (a range check and
    one copy) and at most INLINE_BYTES of them. A thread hop costs more than that on a small model; PNG/JPEG
    decoding and large tensors go to the decode threads so they never hold up other calls."""
    total = 0
    for image in images:
        if image.WhichOneof("source") != "tensor":
            return False
        total += len(image.tensor.data)
        if total > INLINE_BYTES:
            return False
    return True


def decode_encoded(data: bytes, spec: ImageSpec, *, max_pixels: int, field: str) -> np.ndarray:
    """PNG/JPEG bytes -> (C, size, size) float32. The header's size is checked before any pixel is decoded."""
    return imaging.decode_image(data, spec.size, spec.channels, max_pixels=max_pixels, field=field)


def decode_tensor(tensor: pb.Tensor, spec: ImageSpec, *, field: str) -> np.ndarray:
    """A raw (C, size, size) tensor -> float32 in [0, 1]. UINT8 is divided by 255; FLOAT32 must be finite and
    already in [0, 1], and comes back as a read-only view of the request's bytes."""
    return _decode_raw([tensor.data], _tensor_dtype(tensor, spec, field=field), spec, [field])[0]


def _tensor_dtype(tensor: pb.Tensor, spec: ImageSpec, *, field: str) -> np.dtype:
    """The numpy dtype of a raw tensor image whose dtype, shape and byte count fit `spec`; refuses one that does
    not, naming the field."""
    if tensor.dtype not in _DTYPES:
        name = pb.Tensor.DType.Name(tensor.dtype) if tensor.dtype in pb.Tensor.DType.values() else tensor.dtype
        raise InvalidInput(f"{field}.dtype", f"must be UINT8 or FLOAT32, got {name}")
    expected = [spec.channels, spec.size, spec.size]
    if tensor.shape != expected:
        raise InvalidInput(f"{field}.shape", f"must be {expected} (channels, size, size), got {list(tensor.shape)}")
    dtype = _DTYPES[tensor.dtype]
    want = spec.channels * spec.size * spec.size * dtype.itemsize
    if len(tensor.data) != want:
        raise InvalidInput(f"{field}.data", f"holds {len(tensor.data)} bytes; shape and dtype need {want}")
    return dtype


def _decode_raw(data: Sequence[bytes], dtype: np.dtype, spec: ImageSpec, fields: Sequence[str]) -> np.ndarray:
    """Raw tensors of one dtype, already checked by `_tensor_dtype` -> (N, C, size, size) in [0, 1]. FLOAT32
    comes back as a read-only view of the bytes (the caller copies it into its batch)."""
    joined = data[0] if len(data) == 1 else b"".join(data)
    values = np.frombuffer(joined, dtype=dtype).reshape(len(data), spec.channels, spec.size, spec.size)
    return imaging.unit_pixels(values, [f"{field}.data" for field in fields])
