"""The one image decoder (handlers/imaging.py) on its own: corrupt bytes of every kind are refused as
InvalidInput (never another exception, which the server would answer INTERNAL), the request budget counts
header pixels, and 16-bit grayscale is scaled by its full range."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conceptlens.handlers import imaging
from conceptlens.handlers.errors import InvalidInput


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    return [_encode(rgb, "PNG"), _encode(rgb, "JPEG"), _encode(rgb, "JPEG", progressive=True),
            _encode(rgb[..., 0], "PNG"), _encode(rgb[..., 0].astype(np.uint16) * 257, "PNG"),
            _encode(np.asarray(Image.fromarray(rgb).convert("P")), "PNG")]


def test_mutated_images_are_refused_as_invalid_input_only():
    rng = np.random.default_rng(1)
    seeds = _seeds()
    refused = 0
    for n in range(1500):
        data = bytearray(seeds[n % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):  # flip, cut or insert bytes anywhere, header included
            i, op = int(rng.integers(0, len(data))), int(rng.integers(0, 3))
            if op == 0:
                data[i] = int(rng.integers(0, 256))
            elif op == 1:
                del data[i:i + int(rng.integers(1, 50))]
            else:
                data[i:i] = rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8).tobytes()
        try:
            out = imaging.decode_image(bytes(data), 16, 3, max_pixels=1 << 22, field="f")
        except InvalidInput:
            refused += 1
            continue
        assert out.shape == (3, 16, 16) and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1
    assert refused > 100  # the mutations really do break images


def test_request_budget_sums_header_pixels():
    imaging.check_request_pixels([100, 200], 300)
    with pytest.raises(InvalidInput, match=r"images: 2 images of 301 pixels in all, over the server's budget of 300"):
        imaging.check_request_pixels([101, 200], 300)


def test_sixteen_bit_grey_is_scaled_by_its_full_range():
    ramp = np.array([[0, 32768, 65535]], dtype=np.uint16)
    got = imaging.image_pixels(imaging.open_image(_encode(ramp, "PNG"), max_pixels=10, field="f"), 3, 1, field="f")
    np.testing.assert_allclose(got[0, 1], [0.0, 32768 / 65535, 1.0], atol=1e-6)  # the middle row of the resize
