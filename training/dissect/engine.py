"""Streaming Network Dissection over a concept dataset, with the consistency metrics, in two passes.

Pass 1 (real images): per-unit tail quantile sketch (T_k; see `TailSketch`), baselines b_k = mean activation,
per-class mean representations μ_c (for r), GAP ranges (for MIS bins) and concept-class co-occurrence.
Pass 2: IoU counts with T_k fixed, the top-K image pools for unit consistency, MIS histograms; with
`adversarial`, a targeted PGD version of each batch (target drawn ≠ source class) is dissected too with the same
thresholds and masks (they look the same), feeding label stability, the real ∪ adversarial pool and r.
Everything stays on the model's device and nothing grows with the number of images except scalar counters.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.hooks import capture
from conceptlens.handlers.modes import eval_mode
from conceptlens.handlers.zoo import ImageClassifier, resolve_layer

from .iou import IoUAccumulator
from .labels import DETECTOR_IOU, Concept, UnitLabel, concept_table, detectors_by_category, label_units
from .labels import unique_detectors as count_unique
from .metrics import TopKPool, class_specificity, label_stability, representation_ratio, unit_consistency
from .quantile import DEFAULT_K, QuantileSketch, TailSketch

log = logging.getLogger(__name__)

R_BINS = 20
TAIL_MARGIN = 8  # the threshold sketch keeps values above each unit's (1 - 8q) quantile of the first batch


@dataclass(frozen=True)
class DissectConfig:
    layers: tuple[str, ...]
    quantile: float = 0.005  # top-q: T_k is the (1 - q) quantile
    iou_threshold: float = DETECTOR_IOU
    batch_size: int = 32
    sketch_k: int = DEFAULT_K
    top_k: int = 50
    adversarial: bool = False
    eps: float = 8 / 255
    steps: int = 10
    mis_bins: int = 16
    seed: int = 0
    num_workers: int = 0
    max_images: int | None = None
    cache: bool = True  # spill pass-1 activations to disk so pass 2 reads them instead of running the model
    cache_dir: str | None = None  # where the cache files go; None: the system temp directory


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


def unpack(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A collated concept batch in either item order -> (images, class labels or None, masks)."""
    images = next(x for x in batch if torch.is_tensor(x) and x.dim() == 4)
    masks = next((x for x in batch if isinstance(x, Mapping)), None)
    if masks is None:
        raise InvalidInput("data", "items carry no concept masks (a dict category -> mask)")
    labels = next((x for x in batch if torch.is_tensor(x) and x.dim() == 1), None)
    if labels is not None and bool((labels < 0).any()):
        labels = None  # Broden without classes.json: -1
    return images, labels, dict(masks)


def _batches(dataset: Dataset, config: DissectConfig, desc: str) -> Iterator[tuple[int, Sequence[Any]]]:
    n = len(dataset) if config.max_images is None else min(len(dataset), config.max_images)
    subset = dataset if n == len(dataset) else torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
    start = 0
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        yield start, batch
        start += len(batch[0])


def _forward(model: ImageClassifier, layers: Sequence[str], images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    with torch.no_grad(), capture(model, layers, detach=True) as acts:
        logits = model(images)
        return logits, dict(acts)


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
    concepts = concepts_of(dataset)
    categories, concept_cat = concept_table(concepts)
    classes = list(model.classes)
    device = next(model.parameters()).device
    n_images = len(dataset) if config.max_images is None else min(len(dataset), config.max_images)
    directory = (config.cache_dir or tempfile.gettempdir()) if config.cache else None
    with eval_mode(model), _ActivationCache(directory, layers, n_images) as cache:
        stats = _first_pass(model, dataset, config, layers, concepts, classes, device, cache)
        thresholds = _thresholds(model, dataset, config, layers, stats, device, cache)
        cache.rewind()
        result = _second_pass(model, dataset, config, layers, stats, thresholds, concepts, categories, concept_cat,
                              classes, affinity, cache)
    return result


@dataclass
class _Stats:
    sketches: dict[str, TailSketch]
    sums: dict[str, torch.Tensor]
    positions: dict[str, int]
    gap_min: dict[str, torch.Tensor]
    gap_max: dict[str, torch.Tensor]
    rep_sum: dict[str, torch.Tensor]
    class_count: torch.Tensor
    cooc: torch.Tensor  # (concept ids, classes): images of the class containing the concept
    images: int = 0
    labelled: bool = False


def _first_pass(model, dataset, config, layers, concepts, classes, device, cache) -> _Stats:
    num_ids = max(c.id for c in concepts) + 1
    stats = _Stats({}, {}, {}, {}, {}, {}, torch.zeros(len(classes), dtype=torch.float64, device=device),
                   torch.zeros(num_ids, len(classes), dtype=torch.float64, device=device))
    for _, batch in _batches(dataset, config, "dissect pass 1/2"):
        images, labels, masks = unpack(batch)
        images = images.to(device)
        _, acts = _forward(model, layers, images)
        cache.write(acts)
        for name in layers:
            a = acts[name]
            if a.dim() != 4:
                raise InvalidInput("layers", f"{name} outputs shape {tuple(a.shape)}; dissection needs (N,C,H,W)")
            units = a.shape[1]
            if name not in stats.sketches:
                stats.sketches[name] = TailSketch(units, tail=min(1.0, TAIL_MARGIN * config.quantile),
                                                  k=config.sketch_k, seed=config.seed)
                stats.sums[name] = a.new_zeros(units, dtype=torch.float64)
                stats.positions[name] = 0
                stats.gap_min[name] = a.new_full((units,), float("inf"))
                stats.gap_max[name] = a.new_full((units,), float("-inf"))
                stats.rep_sum[name] = a.new_zeros((len(classes), a[0].numel()), dtype=torch.float64)
            stats.sketches[name].update(a.transpose(0, 1).reshape(units, -1))
            stats.sums[name] += a.sum((0, 2, 3)).double()  # per-batch float32 sums; the running total in float64
            stats.positions[name] += a.shape[0] * a.shape[2] * a.shape[3]
            gap = a.mean((2, 3))
            stats.gap_min[name] = torch.minimum(stats.gap_min[name], gap.min(0).values)
            stats.gap_max[name] = torch.maximum(stats.gap_max[name], gap.max(0).values)
            if labels is not None:
                onehot = torch.nn.functional.one_hot(labels.to(device), len(classes)).float()
                stats.rep_sum[name] += (onehot.t() @ a.flatten(1)).double()
        if labels is not None:
            stats.labelled = True
            onehot = torch.nn.functional.one_hot(labels.to(device), len(classes)).double()
            stats.class_count += onehot.sum(0)
            present = torch.zeros(images.shape[0], num_ids, dtype=torch.float64, device=device)
            for m in masks.values():
                ids = m.to(device).flatten(1).clamp(0, num_ids - 1)
                present.scatter_(1, ids, 1.0)
            present[:, 0] = 0
            stats.cooc += present.t() @ onehot
        stats.images += images.shape[0]
    if stats.images == 0:
        raise InvalidInput("data", "the dataset is empty")
    return stats


def _thresholds(model, dataset, config, layers, stats, device, cache) -> dict[str, torch.Tensor]:
    """T_k per layer from pass 1's tail sketches. A layer whose first batch set a tail bound above some unit's
    final quantile (see `TailSketch.covers`) gets an extra pass with the full sketch instead: slower, same answer."""
    p = 1 - config.quantile
    short = [name for name in layers if not stats.sketches[name].covers(p)]
    full: dict[str, QuantileSketch] = {}
    if short:
        log.warning("dissect: the first batch was unrepresentative for %s; rerunning the threshold sketch in full",
                    ", ".join(short))
        cache.rewind()
        for _, batch in _batches(dataset, config, "dissect: full threshold pass"):
            images = unpack(batch)[0].to(device)
            acts = cache.read(images.shape[0], device) if cache.enabled else _forward(model, short, images)[1]
            for name in short:
                a = acts[name]
                if name not in full:
                    full[name] = QuantileSketch(a.shape[1], k=config.sketch_k, seed=config.seed)
                full[name].update(a.transpose(0, 1).reshape(a.shape[1], -1))
    return {name: (full.get(name) or stats.sketches[name]).quantile(p).to(device) for name in layers}


class _ActivationCache:
    """Pass-1 activations written sequentially to one raw float32 file per layer and read back in the same
    order in pass 2, as NetDissect-Lite caches features. Plain file I/O (not mmap), so the resident memory stays
    that of one batch; the files are deleted on exit. Disabled (a no-op) without a directory, and switched off
    with a warning at the first batch when the whole cache would need more than half the free disk space
    (pass 2 then runs the model again: slower, same result)."""

    def __init__(self, directory: str | None, layers: Sequence[str], images: int = 0) -> None:
        self.enabled = directory is not None
        self.layers = list(layers)
        self.images = images
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.paths: dict[str, Path] = {}
        self.files: dict[str, Any] = {}
        if self.enabled:
            root = Path(directory)
            root.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="dissect-", dir=root)
            self.paths = {n: Path(self._tmp.name) / f"{i}.f32" for i, n in enumerate(self.layers)}
            self.files = {n: open(p, "wb") for n, p in self.paths.items()}  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> _ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self.files.values():
            fh.close()
        if self.enabled:
            self._tmp.cleanup()

    def write(self, acts: Mapping[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        if not self.shapes and not self._fits(acts):
            return
        for name in self.layers:
            a = acts[name].detach().float().contiguous()
            self.shapes[name] = tuple(a.shape[1:])
            self.files[name].write(a.cpu().numpy().tobytes())

    def _fits(self, acts: Mapping[str, torch.Tensor]) -> bool:
        """At the first batch: does the whole cache fit in half the free space? If not, turn the cache off."""
        need = 4 * self.images * sum(acts[name][0].numel() for name in self.layers)
        free = shutil.disk_usage(self._tmp.name).free
        if need <= free // 2:
            return True
        log.warning("dissect: the activation cache needs %.1f GB but %s has %.1f GB free; running the model "
                    "again in pass 2 instead", need / 1e9, self._tmp.name, free / 1e9)
        self.__exit__()
        self.enabled, self.files = False, {}
        return False

    def rewind(self) -> None:
        if self.enabled:
            for name, fh in self.files.items():
                fh.close()
                self.files[name] = open(self.paths[name], "rb")  # noqa: SIM115 - closed in __exit__

    def read(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            shape = (batch, *self.shapes[name])
            data = self.files[name].read(4 * int(np.prod(shape)))
            out[name] = torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(shape).copy()).to(device)
        return out


def _target_classes(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels.cpu() + shift) % num_classes


def _second_pass(model, dataset, config, layers, stats, thresholds, concepts, categories, concept_cat, classes,
                 affinity, cache):
    device = next(model.parameters()).device
    n_cls = len(classes)
    baselines = {name: (stats.sums[name] / stats.positions[name]).float() for name in layers}
    means = {name: stats.rep_sum[name] / stats.class_count.clamp(min=1).unsqueeze(1) for name in layers}
    acc = {name: IoUAccumulator(thresholds[name], concept_cat, categories) for name in layers}
    adv_acc = {name: IoUAccumulator(thresholds[name], concept_cat, categories) for name in layers}
    pools = {name: TopKPool(len(thresholds[name]), config.top_k) for name in layers}
    adv_pools = {name: TopKPool(len(thresholds[name]), config.top_k) for name in layers}
    mis_hist = {name: torch.zeros(len(thresholds[name]), config.mis_bins, n_cls, dtype=torch.float64, device=device)
                for name in layers}
    r_hist = {name: torch.zeros(R_BINS, dtype=torch.float64, device=device) for name in layers}
    r_sum = dict.fromkeys(layers, 0.0)
    attack = None
    if config.adversarial:
        if not stats.labelled:
            raise InvalidInput("--adversarial", "the data has no class labels; targeted attacks need them")
        from conceptlens.handlers.attacks import PGD

        attack = PGD(model, eps=config.eps, steps=config.steps, targeted=True, seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    adv_success = adv_total = 0
    for start, batch in _batches(dataset, config, "dissect pass 2/2"):
        images, labels, masks = unpack(batch)
        images = images.to(device)
        ids = torch.arange(start, start + images.shape[0], device=device)
        cls = labels.to(device) if labels is not None else torch.zeros_like(ids)
        acts = cache.read(images.shape[0], device) if cache.enabled else _forward(model, layers, images)[1]
        prepared = acc[layers[0]].prepare(masks, device)  # label statistics shared by every layer
        for name in layers:
            a = acts[name]
            acc[name].update(a, masks, prepared)
            pools[name].update(a.amax((2, 3)), ids, cls)
            if labels is not None:
                lo, hi = stats.gap_min[name], stats.gap_max[name]
                bins = ((a.mean((2, 3)) - lo) / (hi - lo).clamp(min=1e-12) * config.mis_bins).long()
                bins = bins.clamp_(0, config.mis_bins - 1)  # (B, K)
                onehot_b = torch.nn.functional.one_hot(bins, config.mis_bins).double()
                onehot_c = torch.nn.functional.one_hot(cls, n_cls).double()
                mis_hist[name] += torch.einsum("ikb,ic->kbc", onehot_b, onehot_c)
        if attack is not None:
            target = _target_classes(labels, n_cls, gen).to(device)
            res = attack(images, cls, target=target)
            adv_success += int(res.success.sum())
            adv_total += images.shape[0]
            _, adv_acts = _forward(model, layers, res.adv.detach())
            for name in layers:
                a = adv_acts[name]
                adv_acc[name].update(a, masks, prepared)
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
            m["consistency_real_per_unit"] = [float(v) for v in consis_real]
            mis, per_unit = class_specificity(mis_hist[name])
            m["mis"] = mis
            m["mis_per_unit"] = [float(v) for v in per_unit]
        if attack is not None:
            both = TopKPool.merged(pools[name], adv_pools[name])
            consis_all = unit_consistency(both.classes, n_cls, affinity)
            m["consistency_all"] = float(consis_all.mean())
            m["consistency_all_per_unit"] = [float(v) for v in consis_all]
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
        freq = (stats.cooc / stats.class_count.clamp(min=1).unsqueeze(0)).cpu()
        for cid, concept in by_id.items():
            if cid < freq.shape[0] and float(freq[cid].sum()) > 0:
                cooc[concept.name] = {cls_name: round(float(freq[cid, j]), 6) for j, cls_name in enumerate(classes)}
    attack_info = {}
    if attack is not None:
        attack_info = {"kind": "pgd", "targeted": True, "eps": config.eps, "steps": config.steps,
                       "success_rate": adv_success / max(1, adv_total), "images": adv_total}
    return DissectionResult(results, concepts, categories, classes, stats.images, cooc, config, attack_info)
