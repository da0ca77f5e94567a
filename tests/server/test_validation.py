"""Request validation and image decoding as pure functions, without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_service import _png_claiming

from conceptlens.handlers.errors import InvalidInput, UnknownName
from conceptlens.server import validation as v
from conceptlens.server.decoding import ImageSpec, decode_encoded, decode_images, decode_tensor
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

SPEC = ImageSpec(size=8)


def test_defaults_apply_for_zero():
    assert v.top_k(0, 10, "top_k") == 5 and v.top_k(0, 3, "top_k") == 3
    assert v.depth(0, 2) == 1 and v.candidates(0, 128) == 32 and v.candidates(0, 10) == 10
    assert v.layers([], ["a", "b"]) == ["b"]
    assert v.target_class("", ["x", "y"]) is None and v.target_class("y", ["x", "y"]) == 1
    assert v.page(0, "") == (0, 0) and v.page(2, "4") == (4, 2)


def test_layers_come_back_in_network_order():
    assert v.layers(["c", "a"], ["a", "b", "c"]) == ["a", "c"]


@pytest.mark.parametrize(("call", "field", "problem"), [
    (lambda: v.model_name(""), "model", "required"),
    (lambda: v.model_name("../etc"), "model", "not a valid model name"),
    (lambda: v.version(-1), "version", "must be >= 0"),
    (lambda: v.image_count(0, 4), "images", "empty"),
    (lambda: v.image_count(5, 4), "images", "over the server's limit of 4"),
    (lambda: v.top_k(11, 10, "top_k"), "top_k", "must be in 1..10, got 11"),
    (lambda: v.top_k(-1, 10, "top_k_units"), "top_k_units", "must be in 1..10"),
    (lambda: v.layers(["a", "a"], ["a"]), "layers", "requested twice"),
    (lambda: v.layers([], []), "layers", "no traced layers"),
    (lambda: v.target_class("z", ["x"]), "target_class", "unknown class 'z'"),
    (lambda: v.map_size(65, 64), "map_size", "0..64"),
    (lambda: v.depth(3, 2), "depth", "1..2"),
    (lambda: v.candidates(129, 128), "candidates", "1..128"),
    (lambda: v.page(-1, ""), "page_size", ">= 0"),
    (lambda: v.page(1, "abc"), "page_token", "malformed"),
])
def test_bad_values_name_field_and_problem(call, field, problem):
    with pytest.raises(InvalidInput) as info:
        call()
    assert info.value.field == field and problem in info.value.problem


def test_link_work_is_capped():
    from conceptlens.handlers.errors import QueueFull

    assert v.link_work(5, 1, 10) == 0 and v.link_work(5, 3, 30) == 30
    with pytest.raises(QueueFull, match="links 30 units per image, over the server's cap of 29"):
        v.link_work(5, 3, 29)


def test_unknown_layer_is_not_found_listing_valid_ones():
    with pytest.raises(UnknownName, match=r"unknown layer 'x'; valid: a, b"):
        v.layers(["x"], ["a", "b"])


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_images_are_resized_rgb_in_unit_range():
    out = decode_encoded(_png(20, 10), SPEC, max_pixels=10_000, field="f")
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, 200 / 255, atol=1e-6)


def test_decompression_bomb_refused_from_the_header():
    with pytest.raises(InvalidInput, match=r"image too large|over the"):
        decode_encoded(_png_claiming(20000, 20000), SPEC, max_pixels=4096 * 4096, field="images[0].encoded")
    # under PIL's own limit but over ours: still refused before decoding (the data holds one pixel)
    with pytest.raises(InvalidInput, match="header claims 3000x3000 pixels, over the 1000000-pixel limit"):
        decode_encoded(_png_claiming(3000, 3000), SPEC, max_pixels=1_000_000, field="f")


def test_truncated_and_garbage_bytes():
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_encoded(_png(64, 64)[:70], SPEC, max_pixels=10_000, field="f")
    with pytest.raises(InvalidInput, match="not a decodable PNG or JPEG"):
        decode_encoded(b"GIF89a....", SPEC, max_pixels=10_000, field="f")
    with pytest.raises(InvalidInput, match="empty image bytes"):
        decode_encoded(b"", SPEC, max_pixels=10_000, field="f")


def test_raw_tensors_little_endian_uint8_and_float32():
    u8 = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    got = decode_tensor(pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.UINT8, data=u8.tobytes()), SPEC, field="t")
    np.testing.assert_allclose(got, u8 / 255.0, atol=1e-7)
    f32 = np.random.default_rng(0).random((3, 8, 8)).astype("<f4")
    big_endian = f32.astype(">f4").tobytes()  # the same values in the wrong byte order are not accepted silently
    got = decode_tensor(pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=f32.tobytes()), SPEC, field="t")
    np.testing.assert_array_equal(got, f32)
    with pytest.raises(InvalidInput):
        decode_tensor(pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=big_endian), SPEC, field="t")


def test_batch_decoding_names_the_image():
    good = pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.UINT8, data=bytes(192)))
    assert decode_images([good, pb.Image(encoded=_png(8, 8))], SPEC, max_pixels=100).shape == (2, 3, 8, 8)
    with pytest.raises(InvalidInput) as info:
        decode_images([good, pb.Image(tensor=pb.Tensor(shape=[8, 8, 3], dtype=pb.Tensor.UINT8, data=bytes(192)))],
                      SPEC, max_pixels=100)
    assert info.value.field == "images[1].tensor.shape"


def test_mixed_batch_keeps_order_and_names_the_bad_raw_image():
    """Raw tensors are checked as one block per dtype: values land at their own index beside PNG and uint8
    images, and a bad pixel is blamed on its image, not the first of the block."""
    rng = np.random.default_rng(1)
    f32 = [rng.random((3, 8, 8)).astype("<f4") for _ in range(3)]
    u8 = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    raw = [pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=a.tobytes())) for a in f32]
    images = [raw[0], pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.UINT8, data=u8.tobytes())),
              raw[1], pb.Image(encoded=_png(8, 8)), raw[2]]
    got = decode_images(images, SPEC, max_pixels=100)
    assert got.flags.writeable and got.dtype == np.float32
    for index, expected in ((0, f32[0]), (1, u8 / 255.0), (2, f32[1]), (4, f32[2])):
        np.testing.assert_allclose(got[index], expected, atol=1e-7)
    np.testing.assert_array_equal(decode_images(raw, SPEC, max_pixels=100), np.stack(f32))  # raw only: one block
    bad = f32[2].copy()
    bad[1, 2, 3] = 1.5
    images[4] = pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=bad.tobytes()))
    with pytest.raises(InvalidInput, match=r"\[0.\d+, 1.5\]") as info:
        decode_images(images, SPEC, max_pixels=100)
    assert info.value.field == "images[4].tensor.data"


@pytest.mark.parametrize("position", [0, 100, 191])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixel_anywhere_is_refused_as_such(position, bad):
    """min/max double as the finiteness check: NaN or ±inf anywhere is named as such, never as out of range."""
    f32 = np.full(3 * 8 * 8, 0.5, dtype="<f4")
    f32[position] = bad
    with pytest.raises(InvalidInput, match="contains NaN or inf"):
        decode_tensor(pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=f32.tobytes()), SPEC, field="t")


def test_small_raw_tensors_decode_inline_and_the_rest_on_threads():
    from conceptlens.server.decoding import INLINE_BYTES, decode_inline

    small = pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=bytes(768)))
    assert decode_inline([small, small])
    assert not decode_inline([small, pb.Image(encoded=_png(8, 8))])  # PNG/JPEG decoding never runs on the loop
    big = pb.Image(tensor=pb.Tensor(shape=[3, 8, 8], dtype=pb.Tensor.FLOAT32, data=bytes(INLINE_BYTES // 2 + 1)))
    assert not decode_inline([big, big])
