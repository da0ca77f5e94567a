"""Probe results (handlers/probe.py's ImageProbe) to ProbeResult messages. No torch."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from conceptlens_client.v1 import conceptlens_service_pb2 as pb

from . import encoding


def png(image: np.ndarray) -> bytes:
    """(C,H,W) in [0,1] as 8-bit PNG bytes (grey for one channel)."""
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    mode_image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
    buf = io.BytesIO()
    mode_image.save(buf, format="PNG")
    return buf.getvalue()


def result(item, classes: Sequence[str], top_k: int, return_adversarial: bool) -> pb.ProbeResult:
    clean_p = encoding.softmax(item.clean_logits.astype(np.float64))
    adv_p = encoding.softmax(item.adversarial_logits.astype(np.float64))
    top = int(np.argmax(item.clean_logits))
    msg = pb.ProbeResult(
        flipped=item.flipped,
        clean_prediction=encoding.prediction(item.clean_logits, classes, top_k, clean_p),
        adversarial_prediction=encoding.prediction(item.adversarial_logits, classes, top_k, adv_p),
        changed_units=[pb.UnitChange(
            layer=c.layer, unit=c.unit, clean_activation=c.clean_activation,
            adversarial_activation=c.adversarial_activation, concept=c.concept, category=c.category, iou=c.iou,
            clean_delta=c.clean_delta, adversarial_delta=c.adversarial_delta, detector=c.detector)
            for c in item.changes],
        clean_trace=encoding.trace(item.clean_trace, item.clean_logits, classes, clean_p),
        adversarial_trace=encoding.trace(item.adversarial_trace, item.adversarial_logits, classes, adv_p),
        confidence_drop=float(clean_p[top] - adv_p[top]),
    )
    if item.min_eps is not None:
        msg.min_flip_epsilon = item.min_eps
    if return_adversarial:
        adv = item.adversarial.astype("<f4")
        msg.adversarial_image.CopyFrom(pb.Tensor(shape=list(adv.shape), dtype=pb.Tensor.FLOAT32, data=adv.tobytes()))
        msg.adversarial_png = png(item.adversarial)
        h, w = item.perturbation.shape
        msg.perturbation.CopyFrom(pb.ActivationMap(height=h, width=w,
                                                   values=item.perturbation.astype(np.float32).ravel().tolist()))
    return msg
