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


def _ranked(logits: np.ndarray, k: int, probs: np.ndarray | None):
    """Per row of (n, K) logits: (top-k class indices, their logits, their probabilities) as Python lists, with the
    softmax and ranking done once for all rows (numpy calls on one short row cost more in overhead than in
    arithmetic)."""
    probs = softmax(logits.astype(np.float64)) if probs is None else probs
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(logits))[:, None]
    return zip(order.tolist(), logits[rows, order].tolist(), probs[rows, order].tolist(), strict=True)


def _fill_prediction(msg: pb.Prediction, ranked, classes: Sequence[str]) -> None:
    indices, logits, probs = ranked
    for i, z, q in zip(indices, logits, probs, strict=True):
        msg.classes.add(index=i, label=classes[i], logit=z, probability=q)


def predictions(logits: np.ndarray, classes: Sequence[str], k: int, probs: np.ndarray | None = None
                ) -> list[pb.Prediction]:
    """`prediction` for every row of (n, K) logits."""
    out = []
    for ranked in _ranked(logits, k, probs):
        msg = pb.Prediction()
        _fill_prediction(msg, ranked, classes)
        out.append(msg)
    return out


# Responses are built in place (`repeated.add()`, submessage fields) rather than from finished messages: a message
# passed to a constructor is copied into its parent, so nesting built messages copies every unit once per level.

def predict_response(model: str, version: int, logits: np.ndarray, classes: Sequence[str], k: int
                     ) -> pb.PredictResponse:
    response = pb.PredictResponse(model=model, version=version)
    for ranked in _ranked(logits, k, None):
        _fill_prediction(response.predictions.add(), ranked, classes)
    return response


def explain_response(model: str, version: int, logits: np.ndarray, traces: Sequence, classes: Sequence[str],
                     k: int) -> pb.ExplainResponse:
    """One Explanation per image: its top-k prediction and its trace."""
    probs = softmax(logits.astype(np.float64))
    response = pb.ExplainResponse(model=model, version=version)
    for ranked, row, p, result in zip(_ranked(logits, k, probs), logits, probs, traces, strict=True):
        explanation = response.explanations.add()
        _fill_prediction(explanation.prediction, ranked, classes)
        _fill_trace(explanation.trace, result, row, classes, p)
    return response


def _fill_unit(msg: pb.UnitInfluence, u) -> None:
    for c in u.contributors:
        _fill_unit(msg.contributors.add(layer=c.layer, unit=c.unit, delta=c.delta, exact=c.exact,
                                        activation=c.activation, baseline=c.baseline, concept=c.concept,
                                        category=c.category, iou=c.iou, detector=c.detector), c)
    if u.map is not None:
        msg.map.height, msg.map.width = u.map.shape
        msg.map.values.extend(u.map.astype(np.float32).ravel().tolist())


def unit(u) -> pb.UnitInfluence:
    msg = pb.UnitInfluence(layer=u.layer, unit=u.unit, delta=u.delta, exact=u.exact, activation=u.activation,
                           baseline=u.baseline, concept=u.concept, category=u.category, iou=u.iou,
                           detector=u.detector)
    _fill_unit(msg, u)
    return msg


def _fill_trace(msg: pb.Trace, result, logits: np.ndarray, classes: Sequence[str], probs: np.ndarray) -> None:
    target = result.target
    msg.target.index, msg.target.label = int(target), classes[target]
    msg.target.logit, msg.target.probability = float(logits[target]), float(probs[target])
    for lt in result.layers:
        layer = msg.layers.add(layer=lt.layer, share=lt.share, method=lt.method)
        for u in lt.units:
            _fill_unit(layer.units.add(layer=u.layer, unit=u.unit, delta=u.delta, exact=u.exact,
                                       activation=u.activation, baseline=u.baseline, concept=u.concept,
                                       category=u.category, iou=u.iou, detector=u.detector), u)
    msg.adversarial = result.adversarial
    if result.adversarial_score is not None:
        msg.adversarial_score = result.adversarial_score
    msg.summary = result.summary
    if result.plausibility is not None:
        msg.plausibility = result.plausibility


def trace(result, logits: np.ndarray, classes: Sequence[str], probs: np.ndarray | None = None) -> pb.Trace:
    probs = softmax(logits.astype(np.float64)) if probs is None else probs
    msg = pb.Trace()
    _fill_trace(msg, result, logits, classes, probs)
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
