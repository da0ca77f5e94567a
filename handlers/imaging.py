"""The one image decoder: PNG/JPEG bytes and raw pixel arrays -> float32 in [0, 1], for the gRPC server
(server/decoding.py), the Open Inference Protocol (server/oip.py) and the TorchServe handler.

It lives in handlers/ because the TorchServe handler may not import server/ (docs/design.md §1, dependency
direction). Decoding is split in two so callers can budget it: `open_image` reads only the header and refuses
what is too large before a pixel is decoded (per image, and `check_request_pixels` over a whole request);
`image_pixels` does the decoding. numpy and Pillow only, no torch.

16-bit images are scaled, not clipped: Pillow opens a 16-bit grayscale PNG as "I;16" with values 0..65535,
and its own conversion to 8-bit "L" clips them at 255, so mid-grey 32768 would read as 1.0. We divide by
65535 instead (32768 -> 0.50001). 16-bit colour PNGs come from Pillow already reduced to 8 bits per channel.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image as PILImage

from .errors import InvalidInput

FORMATS = ("PNG", "JPEG")
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def open_image(data: bytes | bytearray, *, max_pixels: int, field: str) -> PILImage.Image:
    """The image in `data`, header read and checked, no pixel decoded yet. Refuses (InvalidInput naming `field`)
    empty or undecodable bytes and a header claiming more than `max_pixels` (decompression bombs)."""
    if isinstance(data, bytearray):
        data = bytes(data)
    if not isinstance(data, bytes) or not data:
        raise InvalidInput(field, "empty image bytes" if data == b"" else "must be PNG or JPEG image bytes")
    try:
        img = PILImage.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except PILImage.DecompressionBombError as err:  # far over Pillow's own limit (ours is lower: checked below)
        raise InvalidInput(field, f"image too large to decode ({err})") from None
    except (PILImage.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput(field, "not a decodable PNG or JPEG image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidInput(field, f"header claims {width}x{height} pixels, over the {max_pixels}-pixel limit")
    if width < 1 or height < 1:
        raise InvalidInput(field, f"image has no pixels ({width}x{height})")
    return img


def check_request_pixels(areas: Sequence[int], budget: int, field: str = "images") -> None:
    """Refuse a request whose images together would decode to more than `budget` pixels (from their headers,
    before any decoding): a per-request cap on decode work, whatever the per-image limit allows."""
    total = sum(areas)
    if total > budget:
        raise InvalidInput(field, f"{len(areas)} images of {total} pixels in all, over the server's budget of "
                           f"{budget} decoded pixels per request; send fewer or smaller images")


def image_pixels(img: PILImage.Image, size: int, channels: int, *, field: str) -> np.ndarray:
    """Decode an image from `open_image` -> (channels, size, size) float32 in [0, 1], bilinear resize."""
    try:
        img.load()
        if img.mode in _WIDE_MODES:
            return _wide_pixels(img, size, channels, _WIDE_MODES[img.mode])
        img = img.convert("RGB" if channels == 3 else "L")
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(field, f"truncated or corrupt image data ({err})") from None
    if img.size != (size, size):
        img = img.resize((size, size), PILImage.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    return pixels.reshape(size, size, channels).transpose(2, 0, 1)


def decode_image(data: bytes | bytearray, size: int, channels: int, *, max_pixels: int, field: str) -> np.ndarray:
    """PNG/JPEG bytes -> (channels, size, size) float32 in [0, 1]: `open_image` then `image_pixels`."""
    return image_pixels(open_image(data, max_pixels=max_pixels, field=field), size, channels, field=field)


def unit_pixels(values: np.ndarray, fields: Sequence[str]) -> np.ndarray:
    """Raw images (N, ...) of uint8 (divided by 255) or float32 (finite and in [0, 1], checked per image and
    blamed on `fields[i]`) -> float32. float32 input comes back without a copy when it is already writeable."""
    if values.dtype.kind == "u":
        return values.astype(np.float32) / np.float32(255.0)
    # min and max per image: NaN propagates through both and ±inf lands in one of them, so this is the
    # finiteness check too (np.isfinite(values).all() would be a third pass and a temporary)
    flat = values.reshape(len(values), -1)
    lo, hi = flat.min(1), flat.max(1)
    bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo >= 0.0) & (hi <= 1.0))
    if bad.any():
        j = int(bad.argmax())
        if not (np.isfinite(lo[j]) and np.isfinite(hi[j])):
            raise InvalidInput(fields[j], "contains NaN or inf")
        raise InvalidInput(fields[j], f"FLOAT32 pixels must lie in [0, 1], got [{lo[j]:.3g}, {hi[j]:.3g}]")
    return values.astype(np.float32, copy=False)


def _wide_pixels(img: PILImage.Image, size: int, channels: int, full_scale: float) -> np.ndarray:
    """A 16-bit grayscale image scaled by its full range (Pillow's own 8-bit conversion clips instead)."""
    grey = img.convert("F")  # float32 values 0..65535, exact
    if grey.size != (size, size):
        grey = grey.resize((size, size), PILImage.Resampling.BILINEAR)
    pixels = np.clip(np.asarray(grey, dtype=np.float32) / np.float32(full_scale), 0.0, 1.0)
    return np.broadcast_to(pixels, (channels, size, size)).copy()
