"""Decoding with budgets on a real server over loopback: a request's decoded pixels are capped from the headers,
heavy requests cannot starve a normal client's Predicts, their decode work stops with their deadline, and 16-bit
PNGs are scaled (not clipped) the same way by the server and the shared decoder."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from serving_helpers import SIZE, TEST_LIMITS, config, make_repo

from conceptlens.handlers import imaging
from conceptlens.server.background import BackgroundServer
from conceptlens_client import Client, ServiceError

BIG = 4096


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """An all-zero 4096x4096 RGB PNG: ~50 kB on the wire, 48 MB and ~0.5 s of CPU to decode."""
    return _png(np.zeros((BIG, BIG, 3), np.uint8))


@pytest.fixture(scope="module")
def roomy(bundle_dir, tmp_path_factory):
    """A server taking 64 images and 8 MiB per request; budget of four 4096x4096 images per request."""
    repo = make_repo(tmp_path_factory.mktemp("repo"), bundle_dir)
    limits = replace(TEST_LIMITS, max_images=64, max_message_bytes=8 << 20, max_request_pixels=4 * BIG * BIG)
    with BackgroundServer(config(repo, limits=limits)) as server:
        yield server


def test_sixteen_bit_pngs_are_scaled_not_clipped():
    grey = imaging.decode_image(_png(np.full((8, 8), 32768, np.uint16)), 4, 3, max_pixels=1 << 20, field="f")
    np.testing.assert_allclose(grey, 32768 / 65535, atol=1e-6)
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    got = imaging.decode_image(_png(ramp), 8, 1, max_pixels=1 << 20, field="f")
    np.testing.assert_allclose(got[0], ramp / 65535, atol=1e-6)
    rgb = imaging.decode_image(_png16_rgb(np.full((8, 8, 3), 32768, np.uint16)), 4, 3, max_pixels=1 << 20, field="f")
    np.testing.assert_allclose(rgb, 128 / 255, atol=1e-6)  # Pillow keeps the high byte of each channel


def test_server_predicts_a_sixteen_bit_png_as_its_scaled_pixels(roomy):
    with Client(f"127.0.0.1:{roomy.port}", timeout=30) as client:
        from_png = client.predict([_png(np.full((SIZE, SIZE), 32768, np.uint16))], "small", top_k=4)
        exact = np.full((3, SIZE, SIZE), 32768 / 65535, np.float32)
        from_tensor = client.predict([exact], "small", top_k=4)
        white = client.predict([np.ones((3, SIZE, SIZE), np.float32)], "small", top_k=4)
    logits = lambda r: {c.label: c.logit for c in r.predictions[0].classes}  # noqa: E731
    assert logits(from_png) == pytest.approx(logits(from_tensor), abs=1e-4)
    assert logits(from_png) != pytest.approx(logits(white), abs=1e-3)  # what clipping to 1.0 would have given


def test_request_pixel_budget_is_checked_from_headers(roomy, big_png):
    with Client(f"127.0.0.1:{roomy.port}", timeout=30) as client:
        start = time.monotonic()
        with pytest.raises(ServiceError) as info:
            client.predict([big_png] * 64, "small")
        took = time.monotonic() - start
        assert info.value.code == "INVALID_ARGUMENT"
        message = "images: 64 images of 1073741824 pixels in all, over the server's budget of 67108864"
        assert message in info.value.message
        assert took < 2.0, f"refused after {took:.2f} s: the budget must be checked before decoding"
        assert client.predict([big_png] * 2, "small", timeout=60).predictions  # within budget: decoded


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_heavy_requests_do_not_starve_a_normal_client(roomy, big_png):
    """Four clients send requests of four big PNGs (each at the budget, ~2 s of decoding) with 1 s deadlines,
    back to back, beside a client sending one small PNG per Predict: every normal Predict succeeds, and the
    heavy calls end DEADLINE_EXCEEDED (never INTERNAL/UNKNOWN) without piling up work."""
    target = f"127.0.0.1:{roomy.port}"
    small = _png(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    stop = threading.Event()
    heavy_codes: list[str] = []

    def heavy() -> None:
        with Client(target, timeout=1.0) as client:
            while not stop.is_set():
                try:
                    client.predict([big_png] * 4, "small")
                    heavy_codes.append("OK")
                except ServiceError as err:
                    heavy_codes.append(err.code)

    normal_latency: list[float] = []
    with ThreadPoolExecutor(4) as pool, Client(target, timeout=5.0) as client:
        futures = [pool.submit(heavy) for _ in range(4)]
        time.sleep(1.0)  # the heavy load is on
        try:
            for _ in range(10):
                start = time.monotonic()
                assert client.predict([small], "small").predictions  # raises on any failure
                normal_latency.append(time.monotonic() - start)
                time.sleep(0.2)
        finally:
            stop.set()
            for future in futures:
                future.result()
        # once the heavy calls are gone their decode work is gone too (not just overtaken by small images)
        pool = roomy.servicer._decoder
        drained = time.monotonic() + 5.0
        while pool.pending() and time.monotonic() < drained:
            time.sleep(0.05)
        assert pool.pending() == 0, f"{pool.pending()} images still to decode for calls that have ended"
        start = time.monotonic()
        client.predict([small], "small")
        after = time.monotonic() - start
    assert heavy_codes and set(heavy_codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, heavy_codes
    assert heavy_codes.count("DEADLINE_EXCEEDED") >= len(heavy_codes) // 2, heavy_codes
    assert after < 1.0, f"a small Predict took {after:.2f} s after the heavy load stopped"
    print(f"normal Predict latency beside heavy decoding: max {max(normal_latency):.2f} s, "
          f"median {sorted(normal_latency)[len(normal_latency) // 2]:.2f} s; heavy calls: {len(heavy_codes)}")


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_closing_the_pool_ends_waiting_and_running_calls(big_png):
    """Server stop closes the decode pool: calls still waiting or mid-way fail UNAVAILABLE (ModelLoading) at
    once instead of hanging, and their remaining images are not decoded."""
    import asyncio

    from conceptlens.handlers.errors import ModelLoading
    from conceptlens.server.decode_pool import DecodePool
    from conceptlens.server.decoding import ImageSpec
    from conceptlens_client.v1 import conceptlens_service_pb2 as pb

    async def run() -> list[object]:
        pool = DecodePool(threads=2)
        images = [pb.Image(encoded=big_png)] * 4
        calls = [asyncio.ensure_future(pool.decode(images, ImageSpec(SIZE), max_pixels=BIG * BIG,
                                                   max_request_pixels=None, deadline=None)) for _ in range(3)]
        await asyncio.sleep(0.3)
        start = time.monotonic()
        pool.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=10)
        return [time.monotonic() - start, *outcomes]

    took, *outcomes = asyncio.run(run())
    assert all(isinstance(o, ModelLoading) for o in outcomes), outcomes
    assert took < 3.0  # at most the images already being decoded finish
