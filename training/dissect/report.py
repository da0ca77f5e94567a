"""dissection.json and report.html (with matplotlib PNGs) from a DissectionResult.

dissection.json (schema_version 1):
    model, data, settings, attack     what was dissected and how (quantile q, IoU threshold, sketch, PGD spec)
    concepts                          [{id, name, category}]
    classes, images                   class names; number of probe images
    layers.<name>.metrics             units, detectors, unique_detectors{category..., all}, detectors_by_category,
                                      mean_iou, consistency_real, consistency_all, mis, r_mean, r_hist,
                                      label_stability{detectors, stable_fraction, mean_iou_drop}, ... (per-unit
                                      lists under *_per_unit)
    layers.<name>.units[k]            index, label, category, iou, detector, threshold (T_k), baseline (b_k),
                                      by_category{cat: {label, iou}}, top_images (dataset indices, best first),
                                      top_classes, adv_label / adv_iou (with --adversarial)
    cooccurrence                      concept -> class -> P(concept present | image of class)
Figures: detectors.png (detectors per category per layer), top_<layer>.png (top units' top images with the unit
mask overlaid, the NetDissect figure), consistency.png (per-unit consistency, real vs real ∪ adversarial) and
r_hist.png (representation consistency r) with --adversarial.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptlens.handlers.hooks import capture
from conceptlens.handlers.modes import eval_mode

from .engine import DissectionResult, unpack
from .iou import unit_masks

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
TOP_UNITS = 6
TOP_IMAGES = 5


def to_json(result: DissectionResult, *, model_info: Mapping[str, Any], data_info: Mapping[str, Any]) -> dict:
    cfg = result.config
    layers: dict[str, Any] = {}
    for name, lr in result.layers.items():
        units = []
        for u in lr.units:
            row: dict[str, Any] = {
                "index": u.index, "label": u.label, "category": u.category, "iou": round(u.iou, 6),
                "detector": u.detector, "threshold": float(lr.thresholds[u.index]),
                "baseline": float(lr.baselines[u.index]), "by_category": u.by_category,
                "top_images": [int(i) for i in lr.top_real.ids[u.index].tolist()] if len(lr.top_real) else [],
                "top_classes": [int(i) for i in lr.top_real.classes[u.index].tolist()] if len(lr.top_real) else [],
            }
            if lr.adv_units is not None:
                adv = lr.adv_units[u.index]
                row["adv_label"], row["adv_iou"] = adv.label, round(adv.iou, 6)
            units.append(row)
        layers[name] = {"metrics": lr.metrics, "units": units}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": dict(model_info),
        "data": dict(data_info),
        "settings": {
            "quantile": cfg.quantile, "iou_threshold": cfg.iou_threshold, "top_k": cfg.top_k,
            "sketch": {"kind": "KLL with protected top (ReqSketch rule)", "k": cfg.sketch_k},
            "mis_bins": cfg.mis_bins, "batch_size": cfg.batch_size, "seed": cfg.seed,
        },
        "attack": result.attack,
        "concepts": [{"id": c.id, "name": c.name, "category": c.category} for c in result.concepts],
        "classes": result.classes,
        "images": result.images,
        "layers": layers,
        "cooccurrence": result.cooccurrence,
    }


def write_report(
    result: DissectionResult, out_dir: str | Path, *, model: torch.nn.Module, dataset: Any,
    model_info: Mapping[str, Any], data_info: Mapping[str, Any],
) -> dict[str, Any]:
    """Write dissection.json, the PNGs and report.html into `out_dir`; return the JSON document."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = to_json(result, model_info=model_info, data_info=data_info)
    (out / "dissection.json").write_text(json.dumps(doc, indent=1) + "\n")
    figures = [_detectors_figure(result, out / "detectors.png")]
    for name in result.layers:
        figures.append(_top_units_figure(result, name, model, dataset, out / f"top_{name.replace('.', '_')}.png"))
    figures.append(_consistency_figure(result, out / "consistency.png"))
    if any(lr.r_hist for lr in result.layers.values()):
        figures.append(_r_figure(result, out / "r_hist.png"))
    (out / "report.html").write_text(_html(doc, [f for f in figures if f]))
    log.info("wrote %s", out / "report.html")
    return doc


def _detectors_figure(result: DissectionResult, path: Path) -> str:
    import matplotlib.pyplot as plt

    names = list(result.layers)
    cats = result.categories
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names) * max(1, len(cats)) / 3, 3.2))
    width = 0.8 / max(1, len(cats))
    for j, cat in enumerate(cats):
        values = [result.layers[n].metrics["unique_detectors"].get(cat, 0) for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=cat)
    ax.set_xticks([i + width * (len(cats) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("unique detectors")
    ax.set_title(f"Unique concept detectors (IoU ≥ {result.config.iou_threshold})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _top_units_figure(result: DissectionResult, layer: str, model, dataset, path: Path) -> str | None:
    """Rows: the layer's best units by IoU; columns: their top images with the thresholded unit mask overlaid."""
    import matplotlib.pyplot as plt

    lr = result.layers[layer]
    if not len(lr.top_real):
        return None
    order = sorted(lr.units, key=lambda u: -u.iou)[:TOP_UNITS]
    cols = min(TOP_IMAGES, len(lr.top_real))
    fig, axes = plt.subplots(len(order), cols, figsize=(1.6 * cols, 1.7 * len(order)), squeeze=False)
    device = next(model.parameters()).device
    for row, unit in enumerate(order):
        ids = lr.top_real.ids[unit.index][:cols].tolist()
        images, _, masks = unpack(_collate([dataset[i] for i in ids]))
        with eval_mode(model), torch.no_grad(), capture(model, [layer], detach=True) as acts:
            model(images.to(device))
        size = tuple(next(iter(masks.values())).shape[-2:]) if masks else tuple(images.shape[-2:])
        m = unit_masks(acts[layer][:, unit.index : unit.index + 1], size, lr.thresholds[unit.index : unit.index + 1])
        for col in range(cols):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            mask = m[col, 0].cpu().numpy()
            ax.imshow(np.ma.masked_where(~mask, mask), alpha=0.55, cmap="cool", vmin=0, vmax=1)  # mask pixels only
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"#{unit.index}\n{unit.label or '-'}\n{unit.iou:.3f}", fontsize=7)
    fig.suptitle(f"{layer}: top units, their top images, unit mask (A > T) overlaid", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _collate(items: list) -> list:
    return list(torch.utils.data.default_collate(items))


def _consistency_figure(result: DissectionResult, path: Path) -> str | None:
    import matplotlib.pyplot as plt

    layers = [n for n, lr in result.layers.items() if "consistency_real_per_unit" in lr.metrics]
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 2.8), squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        m = result.layers[name].metrics
        ax.hist(m["consistency_real_per_unit"], bins=20, range=(0, 1), alpha=0.6, label="real")
        if "consistency_all_per_unit" in m:
            ax.hist(m["consistency_all_per_unit"], bins=20, range=(0, 1), alpha=0.6, label="real ∪ adv")
        ax.set_title(f"{name}: unit consistency pᵀAp", fontsize=9)
        ax.set_xlabel("consistency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _r_figure(result: DissectionResult, path: Path) -> str:
    import matplotlib.pyplot as plt

    layers = [n for n, lr in result.layers.items() if lr.r_hist]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 2.8), squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        counts = result.layers[name].r_hist
        edges = [i / len(counts) for i in range(len(counts))]
        ax.bar(edges, counts, width=1 / len(counts), align="edge")
        ax.axvline(0.5, color="k", lw=0.8)
        ax.set_title(f"{name}: r (mean {result.layers[name].metrics['r_mean']:.3f})", fontsize=9)
        ax.set_xlabel("r  (< 0.5 follows the look, > 0.5 the attack)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return html.escape(str(value))


def _html(doc: Mapping[str, Any], figures: list[str]) -> str:
    rows = []
    keys = ["units", "detectors", "unique_detectors", "mean_iou", "consistency_real", "consistency_all", "mis",
            "r_mean", "label_stability"]
    for name, layer in doc["layers"].items():
        m = layer["metrics"]
        rows.append("<tr><td>" + html.escape(name) + "</td>" +
                    "".join(f"<td>{_fmt(m[k]) if k in m else '-'}</td>" for k in keys) + "</tr>")
    units = []
    for name, layer in doc["layers"].items():
        for u in sorted(layer["units"], key=lambda u: -u["iou"])[:15]:
            units.append(f"<tr><td>{html.escape(name)}</td><td>{u['index']}</td><td>{html.escape(u['label'])}</td>"
                         f"<td>{html.escape(u['category'])}</td><td>{u['iou']:.4f}</td><td>{u['detector']}</td></tr>")
    imgs = "\n".join(f'<p><img src="{html.escape(f)}" alt="{html.escape(f)}"></p>' for f in figures)
    head = "".join(f"<th>{k}</th>" for k in ["layer", *keys])
    attack = html.escape(json.dumps(doc["attack"])) if doc["attack"] else "none"
    unit_head = "".join(f"<th>{k}</th>" for k in ["layer", "unit", "label", "category", "IoU", "detector"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ConceptLens dissection</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
table{{border-collapse:collapse;margin-bottom:1.5em}}</style></head><body>
<h1>Dissection of {html.escape(str(doc['model'].get('architecture', 'model')))}</h1>
<p>{doc['images']} probe images from {html.escape(str(doc['data'].get('source', '?')))};
top-q = {doc['settings']['quantile']}, detector at IoU ≥ {doc['settings']['iou_threshold']};
attack: {attack}</p>
<h2>Per layer</h2><table><tr>{head}</tr>{''.join(rows)}</table>
<h2>Best units</h2><table><tr>{unit_head}</tr>
{''.join(units)}</table>
<h2>Figures</h2>{imgs}
</body></html>
"""
