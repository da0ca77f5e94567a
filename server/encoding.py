"""Results (numpy arrays, trace dataclasses) to response messages. No torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conceptlens_client.v1 import conceptlens_service_pb2 as pb


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_score(index: int, classes: Sequence[str], logits: np.ndarray, probs: np.ndarray) -> pb.ClassScore:
    return pb.ClassScore(index=int(index), label=classes[index], logit=float(logits[index]),
                         probability=float(probs[index]))


def prediction(logits: np.ndarray, classes: Sequence[str], k: int, probs: np.ndarray | None = None
               ) -> pb.Prediction:
    """Top-k classes of one image's logits (K,), best first. `probs`: its softmax, when already computed."""
    probs = softmax(logits.astype(np.float64)) if probs is None else probs
    order = np.argsort(-logits, kind="stable")[:k]
    return pb.Prediction(classes=[class_score(i, classes, logits, probs) for i in order])


def predictions(logits: np.ndarray, classes: Sequence[str], k: int, probs: np.ndarray | None = None
                ) -> list[pb.Prediction]:
    """`prediction` for every row of (n, K) logits, with the softmax and ranking done once for all rows (numpy
    calls on one short row cost more in overhead than in arithmetic)."""
    probs = softmax(logits.astype(np.float64)) if probs is None else probs
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = zip(order.tolist(), np.take_along_axis(logits, order, axis=1).tolist(),
               np.take_along_axis(probs, order, axis=1).tolist(), strict=True)
    return [pb.Prediction(classes=[pb.ClassScore(index=i, label=classes[i], logit=z, probability=q)
                                   for i, z, q in zip(idx, zs, qs, strict=True)]) for idx, zs, qs in rows]


def unit(u) -> pb.UnitInfluence:
    msg = pb.UnitInfluence(layer=u.layer, unit=u.unit, delta=u.delta, exact=u.exact, activation=u.activation,
                           baseline=u.baseline, concept=u.concept, category=u.category, iou=u.iou,
                           detector=u.detector)
    if u.contributors:
        msg.contributors.extend(unit(c) for c in u.contributors)
    if u.map is not None:
        msg.map.CopyFrom(pb.ActivationMap(height=u.map.shape[0], width=u.map.shape[1],
                                          values=u.map.astype(np.float32).ravel().tolist()))
    return msg


def trace(result, logits: np.ndarray, classes: Sequence[str], probs: np.ndarray | None = None) -> pb.Trace:
    probs = softmax(logits.astype(np.float64)) if probs is None else probs
    msg = pb.Trace(
        target=class_score(result.target, classes, logits, probs),
        layers=[pb.LayerTrace(layer=lt.layer, units=[unit(u) for u in lt.units], share=lt.share, method=lt.method)
                for lt in result.layers],
        adversarial=result.adversarial,
        summary=result.summary,
    )
    if result.plausibility is not None:
        msg.plausibility = result.plausibility
    return msg


def model(runtime, versions: Sequence[int]) -> pb.Model:
    """The Model resource of one loaded runtime."""
    m = runtime.manifest
    metrics = {k: float(v) for k, v in m.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return pb.Model(
        name=f"models/{runtime.name}/versions/{runtime.version}", model=runtime.name, version=runtime.version,
        available_versions=list(versions), architecture=m.architecture, classes=m.classes,
        input=pb.InputSpec(size=m.input.size, channels=m.input.channels, mean=m.input.mean, std=m.input.std),
        layers=[pb.Layer(name=li.name, units=li.units, detectors=sum(u.detector for u in li.units_info))
                for li in m.layers],
        state=pb.Model.READY, metrics=metrics,
    )
