"""Reply-size check before work: an Explain or Probe whose reply would exceed the message limit is refused with
INVALID_ARGUMENT naming the fields that make it large, before any image is traced; the estimate bounds real
replies from above."""

from __future__ import annotations

import time

import pytest
from serving_helpers import TEST_LIMITS
from test_admission import LAYERS, tensors
from test_service import _scrape, _value

from conceptlens.handlers.errors import InvalidInput
from conceptlens.server import reply_size
from conceptlens_client import ServiceError


def explained_batches(port: int) -> float:
    return _value(_scrape(port), "conceptlens_batch_size_count", model="small", method="explain")


def test_an_explain_whose_reply_would_be_too_large_is_refused_before_work(served):
    server, client = served
    before = explained_batches(server.metrics_port)
    start = time.perf_counter()
    with pytest.raises(ServiceError) as info:
        client.explain(tensors(4), "small", layers=LAYERS, depth=3, top_k_units=8, include_maps=True, map_size=32)
    took = time.perf_counter() - start
    err = info.value
    assert err.code == "INVALID_ARGUMENT"
    assert f"over the server's message limit of {TEST_LIMITS.max_message_bytes}" in err.message
    for field in ("images (4)", "include_maps", "map_size 32x32", "top_k_units"):
        assert field in err.message, field
    assert explained_batches(server.metrics_port) == before  # nothing was traced
    assert took < 2.0, took  # three-layer traces of four images take seconds; the refusal does not


def test_a_probe_returning_large_adversarial_images_is_refused(served):
    server, _ = served
    runtime = server.repository.resolve("small")
    with pytest.raises(InvalidInput) as info:
        reply_size.check_probe(runtime, 2, True, 5, 1, limit=4096)
    assert "return_adversarial" in str(info.value)
    reply_size.check_probe(runtime, 2, False, 5, 1, limit=TEST_LIMITS.max_message_bytes)  # fits


@pytest.mark.parametrize("kwargs", [dict(include_maps=True), dict(include_maps=True, map_size=32, top_k_units=2),
                                    dict(layers=LAYERS, depth=2, top_k_units=3, include_maps=True)])
def test_the_estimate_bounds_real_replies(served, kwargs):
    server, client = served
    runtime = server.repository.resolve("small")
    layers = kwargs.get("layers", [runtime.layer_order[-1]])
    top_k = kwargs.get("top_k_units", 5)
    reply = client.explain(tensors(2), "small", **kwargs)
    estimate = 2 * (reply_size.IMAGE_BYTES + reply_size.CLASS_BYTES * 6
                    + reply_size.units_per_image(len(layers), top_k, kwargs.get("depth", 1))
                    * (reply_size.UNIT_BYTES + 4 * max(kwargs.get("map_size", 0) or reply_size.layer_side(runtime, x)
                                                       for x in layers) ** 2 + 16))
    assert reply.ByteSize() <= estimate
    with pytest.raises(InvalidInput):  # the same request against a limit just below its estimate
        reply_size.check_explain(runtime, 2, layers, top_k, kwargs.get("depth", 1), True,
                                 kwargs.get("map_size", 0), 5, limit=estimate - 1)
