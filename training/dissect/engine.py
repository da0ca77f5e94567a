"""Streaming Network Dissection over a concept dataset, with the consistency metrics, in two passes.

Pass 1 (real images): per-unit tail quantile sketch (T_k; see `TailSketch`), baselines b_k = mean activation,
the top-K image pools for unit consistency, GAP ranges (for MIS bins), concept-class co-occurrence and, for the
adversarial metrics, per-class mean representations μ_c (for r). Pass 2: IoU counts with T_k fixed and MIS
histograms, from the chunks pass 1 cached (`ChunkCache`) or by running the model again; with `adversarial`, a
targeted PGD version of each batch (target drawn ≠ source class) is dissected too with the same thresholds and
masks (they look the same), feeding label stability, the real ∪ adversarial pool and r. All bookkeeping runs per
chunk of several batches (`chunks.py`) and stays on the model's device; nothing grows with the number of images
except scalar counters.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.modes import eval_mode
from conceptlens.handlers.zoo import ImageClassifier, resolve_layer

from .cache import ChunkCache
from .chunks import Candidates, Chunk, ChunkStream, forward, unpack
from .iou import IoUAccumulator
from .labels import DETECTOR_IOU, Concept, UnitLabel, concept_table, detectors_by_category, label_units
from .labels import unique_detectors as count_unique
from .masks import MaskTable
from .metrics import TopKPool, class_specificity, label_stability, representation_ratio, unit_consistency
from .quantile import DEFAULT_K, QuantileSketch, TailSketch

__all__ = ["DissectConfig", "DissectionResult", "LayerResult", "concepts_of", "dissect", "unpack"]

log = logging.getLogger(__name__)

R_BINS = 20
TAIL_MARGIN = 8  # the threshold sketch keeps values above each unit's (1 - 8q) quantile of the first chunk
# The IoU is counted on masks of at most 112 px a side, NetDissect's segmentation resolution for 224-px Broden
# images (docs/design.md §5.4): a 224-px concept set is scored at 112 px, a quarter of the pixels.
MASK_SIZE = 112


@dataclass(frozen=True)
class DissectConfig:
    layers: tuple[str, ...]
    quantile: float = 0.005  # top-q: T_k is the (1 - q) quantile
    iou_threshold: float = DETECTOR_IOU
    batch_size: int = 32  # images per forward pass (and per attack)
    sketch_k: int = DEFAULT_K
    top_k: int = 50
    adversarial: bool = False
    eps: float = 8 / 255
    steps: int = 10
    mis_bins: int = 16
    seed: int = 0
    num_workers: int = 0
    max_images: int | None = None
    cache: bool = True  # keep what pass 2 needs from pass 1 (`ChunkCache`) instead of running the model again
    cache_dir: str | None = None  # where the cache files go; None: the system temp directory
    chunk_bytes: int = 32 << 20  # activations + masks per bookkeeping update (at least one batch)
    mask_size: int | None = MASK_SIZE  # IoU resolution: longer masks are subsampled to it; None: the masks' own


@dataclass
class LayerResult:
    name: str
    units: list[UnitLabel]
    thresholds: torch.Tensor
    baselines: torch.Tensor
    iou: torch.Tensor
    top_real: TopKPool
    metrics: dict[str, Any] = field(default_factory=dict)
    adv_iou: torch.Tensor | None = None
    adv_units: list[UnitLabel] | None = None
    r_hist: list[int] | None = None


@dataclass
class DissectionResult:
    layers: dict[str, LayerResult]
    concepts: list[Concept]
    categories: list[str]
    classes: list[str]
    images: int
    cooccurrence: dict[str, dict[str, float]]
    config: DissectConfig
    attack: dict[str, Any] = field(default_factory=dict)


def concepts_of(dataset: Any) -> list[Concept]:
    """The concept list of a ShapesWorld (`.concepts`: (id, name, category)) or Broden (`.labels`) dataset."""
    if hasattr(dataset, "concepts"):
        return [Concept(int(i), str(n), str(c)) for i, n, c in dataset.concepts]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Mapping):
        return [Concept(int(i), str(v[0]), str(v[1])) for i, v in labels.items() if int(i) > 0]
    raise InvalidInput("data", f"{type(dataset).__name__} has neither .concepts nor .labels (not a concept dataset)")


def dissect(
    model: ImageClassifier, dataset: Dataset, config: DissectConfig, *, affinity: torch.Tensor | None = None
) -> DissectionResult:
    """Dissect `config.layers` of `model` over a concept dataset (items: image, [class], masks).

    `affinity` is the class-affinity matrix A of unit consistency pᵀAp (identity when None).
    """
    layers = list(config.layers)
    if not layers:
        raise InvalidInput("layers", "need at least one layer")
    for layer in layers:
        resolve_layer(model, layer)
    if not 0 < config.quantile < 1:
        raise InvalidInput("quantile", f"must be in (0, 1), got {config.quantile}")
    if config.mask_size is not None and config.mask_size < 1:
        raise InvalidInput("mask_size", f"must be >= 1 (or None for the masks' own size), got {config.mask_size}")
    concepts = concepts_of(dataset)
    categories, concept_cat = concept_table(concepts)
    classes = list(model.classes)
    device = next(model.parameters()).device
    data_classes = list(getattr(dataset, "classes", None) or [])
    labelled = not data_classes or data_classes == classes
    if not labelled:  # e.g. an imported model dissected on ShapesWorld: concepts are fine, its classes are not
        log.warning("the concept images' classes %s are not the model's %s: class-based metrics (consistency, "
                    "co-occurrence) are skipped", data_classes[:4], classes[:4])
    stream = ChunkStream(dataset, MaskTable(concept_cat, categories), device, batch_size=config.batch_size,
                         chunk_bytes=config.chunk_bytes, num_workers=config.num_workers,
                         max_images=config.max_images, labelled=labelled, mask_size=config.mask_size)
    directory = (config.cache_dir or tempfile.gettempdir()) if config.cache else None
    with eval_mode(model), ChunkCache(directory, stream.images, memory_bytes=config.chunk_bytes) as cache:
        stats = _first_pass(model, stream, config, layers, concepts, classes, cache)
        thresholds = _thresholds(model, stream, config, layers, stats, cache)
        result = _second_pass(model, stream, config, layers, stats, thresholds, concepts, categories, concept_cat,
                              classes, affinity, cache)
    return result


@dataclass
class _Stats:
    sketches: dict[str, TailSketch]
    sums: dict[str, torch.Tensor]
    positions: dict[str, int]
    gap_min: dict[str, torch.Tensor]
    gap_max: dict[str, torch.Tensor]
    pools: dict[str, TopKPool]
    rep_sum: dict[str, torch.Tensor]  # only for the adversarial metrics
    class_count: torch.Tensor
    cooc: torch.Tensor  # (concept ids, classes): images of the class containing the concept
    images: int = 0
    labelled: bool = False


def _first_pass(model, stream, config, layers, concepts, classes, cache) -> _Stats:
    device = stream.device
    num_ids = max(c.id for c in concepts) + 1
    stats = _Stats({}, {}, {}, {}, {}, {}, {}, torch.zeros(len(classes), dtype=torch.float64, device=device),
                   torch.zeros(num_ids, len(classes), dtype=torch.float64, device=device))
    for chunk in stream("dissect pass 1/2", model, layers, contains=True):
        candidates: dict[str, Candidates] = {}
        ids = torch.arange(chunk.start, chunk.start + chunk.size, device=device)
        labels = chunk.labels
        cls = labels if labels is not None else torch.zeros_like(ids)
        for name in layers:
            a = chunk.acts[name]
            if a.dim() != 4:
                raise InvalidInput("layers", f"{name} outputs shape {tuple(a.shape)}; dissection needs (N,C,H,W)")
            units = a.shape[1]
            if name not in stats.sketches:
                stats.sketches[name] = TailSketch(units, tail=min(1.0, TAIL_MARGIN * config.quantile),
                                                  k=config.sketch_k, seed=config.seed)
                stats.sketches[name].aim(1 - config.quantile, stream.images * a.shape[2] * a.shape[3])
                stats.sums[name] = a.new_zeros(units, dtype=torch.float64)
                stats.positions[name] = 0
                stats.gap_min[name] = a.new_full((units,), float("inf"))
                stats.gap_max[name] = a.new_full((units,), float("-inf"))
                stats.pools[name] = TopKPool(units, config.top_k)
                if config.adversarial:
                    stats.rep_sum[name] = a.new_zeros((len(classes), a[0].numel()), dtype=torch.float64)
            peak = a.amax((2, 3))
            sketch = stats.sketches[name]
            sketch.update_maps(a, peak)
            gap = a.mean((2, 3))
            stats.sums[name] += gap.sum(0).double() * (a.shape[2] * a.shape[3])  # running total in float64
            stats.positions[name] += a.shape[0] * a.shape[2] * a.shape[3]
            stats.gap_min[name] = torch.minimum(stats.gap_min[name], gap.min(0).values)
            stats.gap_max[name] = torch.maximum(stats.gap_max[name], gap.max(0).values)
            stats.pools[name].update(peak, ids, cls)
            if cache.enabled:  # the bound only rises and stays <= T_k (or `covers` fails), so no map above it is lost
                index = (peak > sketch.bound.view(1, -1)).flatten().nonzero().squeeze(1)
                candidates[name] = Candidates(a.flatten(0, 1).index_select(0, index), index.int(), gap)
            if labels is not None and config.adversarial:
                onehot = torch.nn.functional.one_hot(labels, len(classes)).float()
                stats.rep_sum[name] += (onehot.t() @ a.flatten(1)).double()
        if labels is not None:
            stats.labelled = True
            onehot = torch.nn.functional.one_hot(labels, len(classes)).double()
            stats.class_count += onehot.sum(0)
            stats.cooc += chunk.masks.contains[:, :num_ids].double().t() @ onehot
        cache.write(chunk.record(candidates), chunk.size)
        stats.images += chunk.size
        del chunk, candidates, a  # let the next chunk's buffers reuse this one's memory: the peak stays ~2 chunks
    if stats.images == 0:
        raise InvalidInput("data", "the dataset is empty")
    return stats


def _thresholds(model, stream, config, layers, stats, cache) -> dict[str, torch.Tensor]:
    """T_k per layer from pass 1's tail sketches. A layer whose first chunk set a tail bound above some unit's
    final quantile (see `TailSketch.covers`) gets an extra pass with the full sketch instead: slower, same answer."""
    p = 1 - config.quantile
    short = [name for name in layers if not stats.sketches[name].covers(p)]
    full: dict[str, QuantileSketch] = {}
    if short:
        log.warning("dissect: the first chunk was unrepresentative for %s; rerunning the threshold sketch in full",
                    ", ".join(short))
        cache.close()  # it kept only maps above bounds that now lie above T_k: both passes rerun the model
        for chunk in _replay(model, stream, short, cache, "dissect: full threshold pass"):
            for name in short:
                a = chunk.acts[name]
                if name not in full:
                    full[name] = QuantileSketch(a.shape[1], k=config.sketch_k, seed=config.seed)
                full[name].update(a.transpose(0, 1).reshape(a.shape[1], -1))
    return {name: (full.get(name) or stats.sketches[name]).quantile(p).to(stream.device) for name in layers}


def _replay(model, stream: ChunkStream, layers: Sequence[str], cache: ChunkCache, desc: str,
            keep_images: bool = False) -> Iterator[Chunk]:
    """Pass 1's chunks again: read back from the cache (labels and candidate maps), or (cache off) by running the
    model again. With `keep_images` (attacks) the data is read again for the images, the rest from the cache."""
    if cache.enabled and not keep_images:
        cache.rewind()
        start = 0
        for _ in range(len(cache)):
            chunk = Chunk.from_record(start, cache.read(stream.device))
            start += chunk.size
            yield chunk
        return
    if not cache.enabled:
        yield from stream(desc, model, layers, keep_images=keep_images)
        return
    cache.rewind()
    for chunk in stream(desc, keep_images=True):
        chunk.candidates = Chunk.from_record(chunk.start, cache.read(stream.device)).candidates
        yield chunk


def _target_classes(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels.cpu() + shift) % num_classes


def _mis_counts(gap: torch.Tensor, cls: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int,
                classes: int) -> torch.Tensor:
    """(units, bins, classes) counts of images by GAP bin (over the pass-1 GAP range) and class: one bincount."""
    b = ((gap - lo) / (hi - lo).clamp(min=1e-12) * bins).long().clamp_(0, bins - 1)  # (B, K)
    units = gap.shape[1]
    cells = (torch.arange(units, device=gap.device).view(1, -1) * bins + b) * classes + cls.view(-1, 1)
    return torch.bincount(cells.flatten(), minlength=units * bins * classes).view(units, bins, classes)


def _second_pass(model, stream, config, layers, stats, thresholds, concepts, categories, concept_cat, classes,
                 affinity, cache):
    device = stream.device
    n_cls = len(classes)
    baselines = {name: (stats.sums[name] / stats.positions[name]).float() for name in layers}
    acc = {name: IoUAccumulator(thresholds[name], concept_cat, categories) for name in layers}
    adv_acc = {name: IoUAccumulator(thresholds[name], concept_cat, categories) for name in layers}
    pools = stats.pools
    adv_pools = {name: TopKPool(len(thresholds[name]), config.top_k) for name in layers}
    mis_hist = {name: torch.zeros(len(thresholds[name]), config.mis_bins, n_cls, dtype=torch.float64, device=device)
                for name in layers}
    r_hist = {name: torch.zeros(R_BINS, dtype=torch.float64, device=device) for name in layers}
    r_sum = dict.fromkeys(layers, 0.0)
    attack = None
    if config.adversarial:
        if not stats.labelled:
            raise InvalidInput("--adversarial", "the data has no class labels; targeted attacks need them")
        from conceptlens.handlers.attacks import AttackParams, make_attack

        attack = make_attack("pgd", model, AttackParams(eps=config.eps, steps=config.steps, targeted=True,
                                                        seed=config.seed))
        means = {name: stats.rep_sum[name] / stats.class_count.clamp(min=1).unsqueeze(1) for name in layers}
    gen = torch.Generator().manual_seed(config.seed)
    adv_success = adv_total = 0
    for chunk in _replay(model, stream, layers, cache, "dissect pass 2/2", keep_images=attack is not None):
        for name in layers:
            if name in chunk.candidates:
                c = chunk.candidates[name]
                acc[name].update_maps(c.maps, c.index, chunk.masks, chunk.size)
                gap = c.gap
            else:
                acc[name].update(chunk.acts[name], chunk.masks)
                gap = chunk.acts[name].mean((2, 3))
            if chunk.labels is not None:
                mis_hist[name] += _mis_counts(gap, chunk.labels, stats.gap_min[name], stats.gap_max[name],
                                              config.mis_bins, n_cls)
        if attack is not None:
            cls = chunk.labels
            target = _target_classes(cls, n_cls, gen).to(device)
            adv_parts: list[dict[str, torch.Tensor]] = []
            for i in range(0, chunk.size, config.batch_size):  # attacks run at the forward batch size
                part = slice(i, i + config.batch_size)
                res = attack(chunk.images[part], cls[part], target=target[part])
                adv_success += int(res.success.sum())
                adv_parts.append(forward(model, layers, res.adv.detach())[1])
            adv_total += chunk.size
            ids = torch.arange(chunk.start, chunk.start + chunk.size, device=device)
            for name in layers:
                a = torch.cat([p[name] for p in adv_parts])
                adv_acc[name].update(a, chunk.masks)
                adv_pools[name].update(a.amax((2, 3)), ids, cls)
                r = representation_ratio(a.flatten(1).double(), means[name][cls], means[name][target])
                r_sum[name] += float(r.sum())
                r_hist[name] += torch.histc(r.float(), bins=R_BINS, min=0.0, max=1.0).double()
    results: dict[str, LayerResult] = {}
    for name in layers:
        iou = acc[name].iou()
        units = label_units(iou, concepts, config.iou_threshold)
        lr = LayerResult(name, units, thresholds[name].cpu(), baselines[name].cpu(), iou.cpu(), pools[name])
        m: dict[str, Any] = {
            "units": len(units),
            "detectors": sum(u.detector for u in units),
            "unique_detectors": count_unique(units),
            "detectors_by_category": detectors_by_category(units),
            "mean_iou": float(sum(u.iou for u in units) / len(units)),
        }
        if stats.labelled:
            consis_real = unit_consistency(pools[name].classes, n_cls, affinity)
            m["consistency_real"] = float(consis_real.mean())
            m["consistency_real_per_unit"] = consis_real.tolist()
            mis, per_unit = class_specificity(mis_hist[name])
            m["mis"] = mis
            m["mis_per_unit"] = per_unit.tolist()
        if attack is not None:
            both = TopKPool.merged(pools[name], adv_pools[name])
            consis_all = unit_consistency(both.classes, n_cls, affinity)
            m["consistency_all"] = float(consis_all.mean())
            m["consistency_all_per_unit"] = consis_all.tolist()
            lr.adv_iou = adv_acc[name].iou().cpu()
            lr.adv_units = label_units(lr.adv_iou, concepts, config.iou_threshold)
            m["label_stability"] = label_stability(units, lr.adv_iou)
            m["r_mean"] = r_sum[name] / max(1, adv_total)
            lr.r_hist = [int(v) for v in r_hist[name].cpu()]
            m["r_hist"] = lr.r_hist
            m["unique_detectors_adversarial"] = count_unique(lr.adv_units)
        lr.metrics = m
        results[name] = lr
    cooc = {}
    if stats.labelled:
        by_id = {c.id: c for c in concepts}
        freq = (stats.cooc / stats.class_count.clamp(min=1).unsqueeze(0)).cpu().tolist()  # one call, not 500
        for cid, concept in by_id.items():
            if cid < len(freq) and sum(freq[cid]) > 0:
                cooc[concept.name] = {cls_name: round(freq[cid][j], 6) for j, cls_name in enumerate(classes)}
    attack_info = {}
    if attack is not None:
        attack_info = {"kind": "pgd", "targeted": True, "eps": config.eps, "steps": config.steps,
                       "success_rate": adv_success / max(1, adv_total), "images": adv_total}
    return DissectionResult(results, concepts, categories, classes, stats.images, cooc, config, attack_info)
