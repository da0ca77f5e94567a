"""Influence tracing (docs/design.md §5): which units carried a prediction, and what concepts they detect.

For class c and unit k of layer l, Δ_k = f_c(x) − f_c(x | A_k := b_k): the logit lost when the unit's map is
replaced by its baseline b_k (mean activation on training data, 0 when unknown).

- Last layer before GAP + linear head: exact and free, Δ_k = w_ck·(mean A_k − b_k), computed from the ONNX
  outputs with numpy only (no torch call).
- Hidden layers: every unit is ranked by the first-order estimate Σ_pos ∂f_c/∂A_k · (A_k − b_k); the top M
  candidates then get their exact Δ by re-running only the network suffix, batched over units (the layer's
  output is overridden with one ablated copy per candidate while the prefix runs once).
- Multi-layer links: each top unit of a layer gets its own top contributors one traced layer down, with the same
  two-step method applied to the unit's mean activation instead of a logit.

A trace reports the top-k units by Δ (descending), the share of the layer's positive influence they carry, a
plausibility score from the manifest's concept-class co-occurrence (read against the class's own clean images when
the manifest calibrates it, `handlers/plausibility.py`), an adversarial score and flag (the model's
calibrated detector, `handlers/detector.py`) and a one-sentence summary such as
"car: units for wheel (IoU .31) and window (IoU .22) carried 71% of the score".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .backends import ModelRuntime
from .detector import detector_for
from .hooks import capture, override
from .modes import eval_mode
from .plausibility import calibration_for

EXACT_LAST = "exact-last-layer"
SUFFIX = "suffix-rerun"


@dataclass(frozen=True)
class TraceOptions:
    layers: Sequence[str]  # network order, shallow first
    top_k_units: int = 5
    target: int | None = None  # class index; None = top prediction
    include_maps: bool = False
    map_size: int = 0  # 0 = the layer's resolution
    depth: int = 1  # 1 = no links
    candidates: int = 32
    chunk: int = 64  # ablated copies per suffix re-run
    check: Callable[[], None] | None = None  # called between exact passes; raises to stop (call ended, deadline)


@dataclass
class UnitTrace:
    layer: str
    unit: int
    delta: float
    exact: bool
    activation: float
    baseline: float
    concept: str = ""
    category: str = ""
    iou: float = 0.0
    detector: bool = False
    map: np.ndarray | None = None
    contributors: list[UnitTrace] = field(default_factory=list)


@dataclass
class LayerTrace:
    layer: str
    units: list[UnitTrace]
    share: float
    method: str


@dataclass
class TraceResult:
    target: int
    layers: list[LayerTrace]
    plausibility: float | None
    adversarial: bool
    summary: str
    adversarial_score: float | None = None  # in [0, 1], higher = more likely adversarial (None: nothing to score
    # with, i.e. no detector and no plausibility); `adversarial` thresholds it
    raw_plausibility: float | None = None  # before the per-class calibration; = plausibility without one


def last_layer_deltas(acts: np.ndarray, weight_c: np.ndarray, baselines: np.ndarray) -> np.ndarray:
    """Exact Δ for every unit of the layer feeding GAP + linear head: w_ck·(mean A_k − b_k). acts: (C, h, w)."""
    return weight_c * (acts.reshape(acts.shape[0], -1).mean(axis=1) - baselines)


def trace_image(
    runtime: ModelRuntime,
    image: np.ndarray,
    logits: np.ndarray,
    acts: dict[str, np.ndarray],
    options: TraceOptions,
    *,
    plausibility_threshold: float = 0.5,
    means: dict[str, np.ndarray] | None = None,
) -> TraceResult:
    """Trace one image. `image` (C,H,W) in [0,1]; `logits` (K,) and `acts` (layer -> (C,h,w)) from the ONNX pass;
    `means` (layer -> (C,) spatial means of `acts`) when the caller computed them for a whole batch at once."""
    target = int(np.argmax(logits)) if options.target is None else options.target
    if means is None:
        means = {name: a.reshape(a.shape[0], -1).mean(axis=1) for name, a in acts.items()}
    layers: list[LayerTrace] = []
    x: torch.Tensor | None = None
    for depth_index, layer in enumerate(reversed(options.layers)):  # deepest first, links need the layer below
        a = acts[layer]
        base = runtime.baselines[layer]
        if runtime.head is not None and runtime.head.layer == layer:
            deltas = runtime.head.weight[target] * (means[layer] - base)  # = last_layer_deltas, means reused
            order = np.argsort(-deltas, kind="stable")[: options.top_k_units]
            top = [(int(k), float(deltas[k]), True) for k in order]
            share = _share(deltas[order], deltas)
            method = EXACT_LAST
        else:
            x = x if x is not None else torch.from_numpy(image).unsqueeze(0).to(runtime.device)
            units, exact, _ = hidden_deltas(runtime, x, layer, _class_target(target), [], options)
            order = np.argsort(-exact, kind="stable")[: options.top_k_units]
            top = [(int(units[i]), float(exact[i]), True) for i in order]
            share = _share(exact[order], exact)
            method = SUFFIX
        unit_traces = [_unit(runtime, layer, k, d, ex, a, means[layer], options) for k, d, ex in top]
        if depth_index == 0 and options.depth > 1:
            below = list(options.layers)[: len(options.layers) - 1]
            x = x if x is not None else torch.from_numpy(image).unsqueeze(0).to(runtime.device)
            _link(runtime, x, layer, unit_traces, below, acts, means, options, options.depth - 1)
        layers.append(LayerTrace(layer, unit_traces, share, method))
    layers.reverse()
    deepest = layers[-1]
    raw = plausibility(runtime, deepest.units, runtime.classes[target])
    plaus = _calibrated(runtime, raw, target)
    detector = detector_for(runtime)
    pooled = None
    if detector is not None:  # its layer's pooled activations: traced already, else one more ONNX pass
        pooled = means[detector.layer] if detector.layer in means else \
            runtime.forward(image[None]).activations[detector.layer][0].mean(axis=(1, 2))
    ((score, adversarial),) = adversarial_flags(runtime, logits[None], None if pooled is None else pooled[None],
                                                [plaus], plausibility_threshold)
    return TraceResult(target, layers, plaus, adversarial, summarize(runtime.classes[target], deepest), score, raw)


def _calibrated(runtime: ModelRuntime, raw: float | None, target: int) -> float | None:
    """The served plausibility: `raw` read against the target class's clean images when the manifest calibrates
    it (handlers/plausibility.py), else `raw`."""
    calibration = calibration_for(runtime)
    return raw if calibration is None else calibration(raw, target)


def adversarial_flags(runtime: ModelRuntime, logits: np.ndarray, pooled: np.ndarray | None,
                      plaus: Sequence[float | None],
                      plausibility_threshold: float) -> list[tuple[float | None, bool]]:
    """(adversarial_score, flag) per image: the model's calibrated detector when its manifest has one (logits
    (n, K), `pooled` (n, C) of the detector's layer); else 1 − plausibility, flagged below the server's
    plausibility threshold (no score and no flag when plausibility is unknown)."""
    detector = detector_for(runtime)
    if detector is None or (pooled is None and "mahalanobis" in detector.components):
        return [(None, False) if p is None else (1.0 - p, p < plausibility_threshold) for p in plaus]
    values = np.array([np.nan if p is None else p for p in plaus]) if detector.needs_plausibility else None
    scores = detector.score(logits, pooled, values)
    flags = detector.flags(scores, np.asarray(logits).argmax(axis=1))  # the predicted class's threshold
    return [(float(s), bool(f)) for s, f in zip(scores.tolist(), flags.tolist(), strict=True)]


@dataclass(frozen=True)
class UnitTable:
    """What every trace of one layer repeats per unit, built once per model version: the manifest's unit facts
    as plain Python values and each unit's plausibility weight per class (`plausibility` below, precomputed)."""

    baselines: list[float]
    labels: list[str]
    categories: list[str]
    ious: list[float]
    detectors: list[bool]
    # plaus[k][c] = P(concept_k | class c) / max over classes; None when unit k has no concept in the table
    plaus: list[list[float] | None]
    named: list[str]  # unit k as the summary names it, e.g. "wheel (IoU .31)"; "" without a concept


_TABLES: weakref.WeakKeyDictionary[ModelRuntime, dict[str, UnitTable]] = weakref.WeakKeyDictionary()


def unit_table(runtime: ModelRuntime, layer: str) -> UnitTable:
    """The layer's UnitTable, cached with the runtime (a reloaded version gets its own; racing builders are
    harmless: both build the same table)."""
    tables = _TABLES.setdefault(runtime, {})
    if layer not in tables:
        infos = runtime.layers[layer].units_info
        cooc = runtime.manifest.cooccurrence
        plaus: list[list[float] | None] = []
        for info in infos:
            row = cooc.get(info.label) if info.label else None
            if row is None:
                plaus.append(None)
                continue
            peak = max(row.values(), default=0.0)
            plaus.append([row.get(c, 0.0) / peak if peak > 0 else 0.0 for c in runtime.classes])
        tables[layer] = UnitTable(
            baselines=runtime.baselines[layer].tolist(), labels=[i.label for i in infos],
            categories=[i.category for i in infos], ious=[float(i.iou) for i in infos],
            detectors=[bool(i.detector) for i in infos], plaus=plaus,
            named=[f"{i.label} (IoU {_iou(float(i.iou))})" if i.label else "" for i in infos])
    return tables[layer]


def trace_last_layer(
    runtime: ModelRuntime,
    logits: np.ndarray,
    acts: np.ndarray,
    means: np.ndarray,
    options: TraceOptions,
    *,
    plausibility_threshold: float = 0.5,
) -> list[TraceResult]:
    """`trace_image` for a whole batch whose only traced layer feeds the linear head (depth 1): the same results,
    with Δ, ranking and shares computed for all images in one numpy pass and the per-unit manifest facts taken
    from the layer's UnitTable. logits (n, K); acts (n, C, h, w) and means (n, C) of that layer."""
    head = runtime.head
    if head is None or list(options.layers) != [head.layer] or options.depth != 1:
        raise ValueError("trace_last_layer traces exactly the head's layer at depth 1; use trace_image")
    # array methods and plain indexing, not np.* wrappers: at batch 1 their overhead is most of the cost
    layer, n = head.layer, len(logits)
    targets = logits.argmax(axis=1) if options.target is None else np.full(n, options.target, dtype=np.intp)
    deltas = head.weight[targets] * (means - runtime.baselines[layer])  # (n, C): w_ck·(mean A_k − b_k) per image
    order = (-deltas).argsort(axis=1, kind="stable")[:, : options.top_k_units]
    rows = np.arange(n)[:, None]
    top = deltas[rows, order]
    positive = np.maximum(deltas, 0).sum(axis=1)  # = np.clip(·, 0, None), as _share computes it
    top_positive = np.maximum(top, 0).sum(axis=1)
    table = unit_table(runtime, layer)
    has_cooc = bool(runtime.manifest.cooccurrence)
    rows = zip(targets.tolist(), order.tolist(), top.tolist(), means[rows, order].tolist(),
               positive.tolist(), top_positive.tolist(), strict=True)
    results, plaus_all = [], []
    for i, (target, ks, ds, activations, total, carried) in enumerate(rows):
        units = [UnitTrace(layer=layer, unit=k, delta=d, exact=True, activation=a, baseline=table.baselines[k],
                           concept=table.labels[k], category=table.categories[k], iou=table.ious[k],
                           detector=table.detectors[k],
                           map=activation_map(acts[i, k], options.map_size) if options.include_maps else None)
                 for k, d, a in zip(ks, ds, activations, strict=True)]
        trace = LayerTrace(layer, units, carried / total if total > 0 else 0.0, EXACT_LAST)
        raw = _table_plausibility(table, units, target) if has_cooc else None
        plaus = _calibrated(runtime, raw, target)
        plaus_all.append(plaus)
        summary = summarize(runtime.classes[target], trace, name=lambda u: table.named[u.unit])
        results.append(TraceResult(target, [trace], plaus, False, summary, raw_plausibility=raw))
    detector = detector_for(runtime)
    pooled = means if detector is not None and detector.layer == layer else None
    for result, (score, flag) in zip(results, adversarial_flags(runtime, logits, pooled, plaus_all,
                                                                 plausibility_threshold), strict=True):
        result.adversarial_score, result.adversarial = score, flag
    return results


def _table_plausibility(table: UnitTable, units: Sequence[UnitTrace], target: int) -> float | None:
    """`plausibility` with the per-unit weights precomputed in the table."""
    return _weighted_plausibility(units, lambda u: None if table.plaus[u.unit] is None else table.plaus[u.unit][target])


def hidden_deltas(
    runtime: ModelRuntime,
    x: torch.Tensor,
    layer: str,
    target: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    watch: Sequence[str],
    options: TraceOptions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate units, their exact Δ, first-order estimates of all units) for `target` at `layer`.

    `target(logits, captured) -> (B,)` reads the quantity to explain from a forward pass; `watch` lists the
    layers it needs captured (for contributor links: the upper layer).
    """
    if options.check is not None:
        options.check()
    model = runtime.torch_model
    base = torch.as_tensor(runtime.baselines[layer], device=x.device)
    with runtime.torch_lock, eval_mode(model), ExitStack() as guards:
        # downstream in-place ops (torchvision's ReLU(inplace=True)) must not rewrite what we captured: the
        # network continues on a clone while `capture`, registered first, keeps the original
        store = guards.enter_context(capture(model, [layer, *watch]))
        for name in [layer, *watch]:
            guards.enter_context(override(model, name, torch.clone))
        with torch.enable_grad():
            logits = model(x)
            a = store[layer]
            value = target(logits, store)[0]
            (grad,) = torch.autograd.grad(value, a)
        guards.close()
        a = a.detach()
        shift = a - base.view(1, -1, 1, 1)
        estimate = (grad * shift).sum(dim=(2, 3))[0]
        m = min(options.candidates, estimate.numel())
        units = torch.topk(estimate, m).indices
        with torch.no_grad():
            deltas = value.detach() - _ablate(model, x, layer, a, base, units, target, watch, options.chunk)
    return units.cpu().numpy(), deltas.float().cpu().numpy(), estimate.detach().float().cpu().numpy()


def _ablate(model, x, layer, a, base, units, target, watch, chunk) -> torch.Tensor:
    """target(x | A_k := b_k) for each k in `units`, re-running the suffix on one ablated copy per unit."""
    out = []
    for start in range(0, units.numel(), chunk):
        ks = units[start : start + chunk]
        n = ks.numel()
        ablated = a.expand(n, -1, -1, -1).clone()
        ablated[torch.arange(n, device=a.device), ks] = base[ks].view(-1, 1, 1).to(a.dtype)
        with ExitStack() as hooks:
            hooks.enter_context(override(model, layer, lambda _out, t=ablated: t.clone()))
            store = hooks.enter_context(capture(model, list(watch)))
            for name in watch:  # as above: in-place ops downstream must not rewrite the captured upper layer
                hooks.enter_context(override(model, name, torch.clone))
            logits = model(x)  # prefix on one image; the override makes the suffix run on n copies
            if logits.shape[0] != n:  # something between layer and output did not broadcast: rerun it all
                logits = model(x.expand(n, -1, -1, -1))
            out.append(target(logits, store))
    return torch.cat(out)


def _class_target(c: int) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    return lambda logits, _store: logits[:, c]


def _unit_target(layer: str, k: int) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    return lambda _logits, store: store[layer][:, k].mean(dim=(1, 2))


def _link(runtime, x, upper, units, below, acts, means, options, levels) -> None:
    """Give each unit of `upper` its top contributors in the next shallower traced layer, `levels` deep."""
    if levels <= 0 or not below:
        return
    lower = below[-1]
    for unit in units:
        ks, exact, _ = hidden_deltas(runtime, x, lower, _unit_target(upper, unit.unit), [upper], options)
        order = np.argsort(-exact, kind="stable")[: options.top_k_units]
        unit.contributors = [
            _unit(runtime, lower, int(ks[i]), float(exact[i]), True, acts[lower], means[lower], options)
            for i in order
        ]
        _link(runtime, x, lower, unit.contributors, below[:-1], acts, means, options, levels - 1)


def _unit(runtime: ModelRuntime, layer: str, k: int, delta: float, exact: bool, a: np.ndarray, means: np.ndarray,
          options: TraceOptions) -> UnitTrace:
    info = runtime.layers[layer].units_info[k]
    return UnitTrace(
        layer=layer, unit=k, delta=delta, exact=exact, activation=float(means[k]),
        baseline=float(runtime.baselines[layer][k]), concept=info.label, category=info.category,
        iou=float(info.iou), detector=bool(info.detector),
        map=activation_map(a[k], options.map_size) if options.include_maps else None,
    )


def activation_map(a: np.ndarray, size: int) -> np.ndarray:
    """One unit's (h, w) map, bilinearly resized to (size, size) when size > 0."""
    if size <= 0 or (size, size) == a.shape:
        return a.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _share(top: np.ndarray, all_deltas: np.ndarray) -> float:
    total = float(np.clip(all_deltas, 0, None).sum())
    return float(np.clip(top, 0, None).sum()) / total if total > 0 else 0.0


def plausibility(runtime: ModelRuntime, units: Sequence[UnitTrace], label: str) -> float | None:
    """Influence-weighted co-occurrence of the top units' concepts with the class, in [0, 1].

    Each concept's row P(concept | class) is scaled by its maximum over classes, so 1 means "this concept goes
    with this class as much as with any class". Only units present in the input vouch for their concept
    (activation above the baseline b_k, docs/design.md §5): a unit that raises the score by being absent (Δ > 0 from
    a negative weight) says nothing about its concept being there. Units without a concept, with Δ ≤ 0, or at
    or below their baseline carry no weight. None when the manifest has no co-occurrence table or no unit
    qualifies.
    """
    table = runtime.manifest.cooccurrence
    if not table:
        return None

    def weight(unit: UnitTrace) -> float | None:
        row = table.get(unit.concept) if unit.concept else None
        if row is None:
            return None
        peak = max(row.values(), default=0.0)
        return row.get(label, 0.0) / peak if peak > 0 else 0.0

    return _weighted_plausibility(units, weight)


def _weighted_plausibility(units: Sequence[UnitTrace], weight: Callable[[UnitTrace], float | None]) -> float | None:
    """Σ Δ·weight / Σ Δ over the units present (activation > baseline) with Δ > 0 and a weight (a concept in the
    co-occurrence table)."""
    num = den = 0.0
    for unit in units:
        w = weight(unit) if unit.delta > 0 and unit.activation > unit.baseline else None
        if w is None:
            continue
        num += unit.delta * w
        den += unit.delta
    return num / den if den > 0 else None


def summarize(label: str, layer: LayerTrace, name: Callable[[UnitTrace], str] | None = None) -> str:
    """e.g. "car: units for wheel (IoU .31) and window (IoU .22) carried 71% of the score". `name` formats a unit
    with a concept (default: "wheel (IoU .31)"); the batched trace passes names formatted once per model."""
    name = name or (lambda unit: f"{unit.concept} (IoU {_iou(unit.iou)})")
    named: list[str] = []
    for unit in layer.units:
        if unit.concept and unit.delta > 0 and not any(n.startswith(unit.concept + " ") for n in named):
            named.append(name(unit))
        if len(named) == 3:
            break
    if named:
        subject = "units for " + (named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1])
    else:
        ids = [str(u.unit) for u in layer.units[:3]]
        subject = f"{layer.layer} units " + (ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + " and " + ids[-1])
    return f"{label}: {subject} carried {round(100 * layer.share)}% of the score"


def _iou(value: float) -> str:
    text = f"{value:.2f}"
    return text[1:] if text.startswith("0") else text
