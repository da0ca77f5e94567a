"""How well each candidate detector tells clean from adversarial inputs, on one bundle (issue 13, item 5).

Clean images: held-out ShapesWorld images the model never saw (a test-split seed that no training, dissection or
calibration set uses). Adversarial pools, made on those images against the bundle's own model
(`training/pools.py`): the white-box minimal-ε pool (only images that flip within the ε cap) and the confident
pool (the wrong class at probability >= 0.9). Candidates, each fitted and calibrated exactly as the served
detector is (`training/calibrate.py`): max-softmax and plausibility raw (the baselines), each standardised per
class, Mahalanobis (Lee et al. 2018) on the traced layer's pooled activations, and combinations. Reported:
AUROC per pool with bootstrap 95% intervals over images, each candidate's difference from raw max-softmax with
its interval and verdict, the clean flag rate at the calibrated per-class thresholds overall and per class (true
and predicted) with binomial 95% intervals, the mean clean trace plausibility per class, and ROC curves.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptlens.handlers import detector as D

log = logging.getLogger(__name__)

CANDIDATES = ("max_softmax", "plausibility", "mahalanobis", "mahalanobis+max_softmax",
              "mahalanobis*0.7+max_softmax*0.3", "mahalanobis+plausibility", "mahalanobis+max_softmax+plausibility")
RAW_BASELINES = ("max_softmax", "plausibility")  # scored as they are, without per-class standardisation
BASELINE = "raw max_softmax"
UNCALIBRATED = "raw plausibility, uncalibrated"  # before the per-class calibration of the bundle's manifest
EVAL_DATA = "shapes:270:2000"  # test split: ShapesWorld seed 6002 (attacked; 30 images per class)
FPR_DATA = "shapes:4500:3000"  # test split: ShapesWorld seed 9002 (clean only; 500 per class for flag rates)


@dataclass(frozen=True)
class DetectorEvalConfig:
    bundle: Path
    out: Path
    data: str = EVAL_DATA
    fpr_data: str = FPR_DATA
    calibration: str = "shapes:6000:1000"  # = training.calibrate.DEFAULT_CALIBRATION (val split, seed 3001)
    fit: str | None = None  # default: the bundle's training data
    fit_limit: int | None = None
    fpr: float = 0.05
    eps_cap: float = 32 / 255
    steps: int = 10
    confident_schedule: tuple[float, ...] = (16 / 255, 32 / 255, 64 / 255)
    candidates: tuple[str, ...] = CANDIDATES
    resamples: int = 1000
    seed: int = 0


def evaluate_detectors(cfg: DetectorEvalConfig) -> dict[str, Any]:
    """Run the comparison; write detectors.json, detectors.md and roc.png into cfg.out; return the results."""
    import torch

    from conceptlens.handlers.backends import ModelRuntime
    from conceptlens.handlers.bundle import load_bundle
    from conceptlens.training import calibrate as C
    from conceptlens.training import pools as P
    from conceptlens.training.stats import binomial_interval, bootstrap_auroc, bootstrap_mean

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(cfg.bundle, verify_onnx=False)
    runtime = ModelRuntime(bundle, device="cpu")
    model = runtime.torch_model
    layer = runtime.head.layer if runtime.head is not None else runtime.layer_order[-1]
    size = bundle.manifest.input.size
    images, labels = C.dataset_images(cfg.data, "test", size)
    fit = cfg.fit or C._training_data(bundle.manifest)
    fit_images, fit_labels = C.dataset_images(fit, "train", size, cfg.fit_limit)
    calib_images, _ = C.dataset_images(cfg.calibration, "val", size)
    x = torch.from_numpy(images)
    t0 = time.perf_counter()
    pools = {"white_box_min_eps": P.minimal_eps_pool(model, x, eps_cap=cfg.eps_cap, steps=cfg.steps),
             "confident": P.confident_pool(model, x, eps_schedule=cfg.confident_schedule, steps=cfg.steps)}
    attack_s = time.perf_counter() - t0
    fpr_images, fpr_labels = C.dataset_images(cfg.fpr_data, "test", size)
    sets = {"clean": images, **{name: pool.adv.numpy() for name, pool in pools.items()}, "fpr_clean": fpr_images}
    outputs = {name: C.served_outputs(runtime, imgs, layer, plausibility=True) if len(imgs) else None
               for name, imgs in sets.items()}
    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in sets}
    for raw in RAW_BASELINES:
        for name, o in outputs.items():
            if o is not None:
                scores[name][f"raw {raw}"] = D.raw_scores([raw], o[0], o[1], o[2], None, None)[raw]
    # the trace plausibility before its per-class calibration (handlers/plausibility.py), when the bundle has one
    uncalibrated = {}
    if getattr(bundle.manifest, "plausibility_calibration", None):
        for name, imgs in sets.items():
            if outputs[name] is not None:
                uncalibrated[name] = C.served_outputs(runtime, imgs, layer, plausibility=True, raw=True)[2]
                scores[name][UNCALIBRATED] = 1.0 - np.nan_to_num(uncalibrated[name], nan=0.0)
    thresholds, calib_reports = {}, {}
    detectors = {}
    for kind in cfg.candidates:
        det, report = C.fit_detector(runtime, kind=kind, layer=layer, fit_images=fit_images, fit_labels=fit_labels,
                                     calib_images=calib_images, fpr=cfg.fpr)
        detectors[kind], thresholds[kind], calib_reports[kind] = det, det.threshold, report
        for name, o in outputs.items():
            if o is not None:
                scores[name][kind] = det.score(o[0], o[1], o[2])
    shipped = getattr(bundle.manifest, "adversarial_detector", None)
    results: dict[str, Any] = {
        "bundle": str(cfg.bundle), "layer": layer, "clean_images": len(images), "data": cfg.data,
        "fpr_data": cfg.fpr_data, "fpr_images": len(fpr_images),
        "calibration": cfg.calibration, "fit": fit, "target_fpr": cfg.fpr, "eps_cap": cfg.eps_cap,
        "pools": {name: pool.summary() for name, pool in pools.items()},
        "clean_accuracy": float((outputs["clean"][0].argmax(1) == labels).mean()),
        "shipped_detector": None if shipped is None else shipped["kind"],
        "auroc": {}, "difference_vs_baseline": {}, "thresholds": thresholds, "calibration_reports": calib_reports,
    }
    names = list(scores["clean"])
    for pool in pools:
        if pools[pool].size == 0:
            results["auroc"][pool] = {k: None for k in names}
            continue
        single, pairs = bootstrap_auroc({k: scores["clean"][k] for k in names}, {k: scores[pool][k] for k in names},
                                        resamples=cfg.resamples, seed=cfg.seed)
        results["auroc"][pool] = {k: v.to_json() for k, v in single.items()}
        results["difference_vs_baseline"][pool] = {
            k: {**pairs[(k, BASELINE)].to_json(), "verdict": _verdict(pairs[(k, BASELINE)])}
            for k in names if k != BASELINE}
    # clean flag rates at each calibrated (per predicted class) threshold, on a larger held-out clean set of another
    # seed, overall and per true / predicted class, each with its binomial 95% interval
    predicted, labels = outputs["fpr_clean"][0].argmax(1), fpr_labels
    flag_rates = {}

    def rate(flags: np.ndarray) -> dict[str, float] | None:
        return binomial_interval(int(flags.sum()), len(flags)).to_json() if len(flags) else None

    for kind, det in detectors.items():
        flags = det.flags(scores["fpr_clean"][kind], predicted)
        flag_rates[kind] = {
            "overall": bootstrap_mean(list(flags.astype(float)), resamples=cfg.resamples, seed=cfg.seed).to_json(),
            "by_class": {c: float(flags[labels == i].mean()) for i, c in enumerate(runtime.classes)},
            "by_class_interval": {c: rate(flags[labels == i]) for i, c in enumerate(runtime.classes)},
            "by_predicted_class": {c: float(flags[predicted == i].mean()) if np.any(predicted == i) else None
                                   for i, c in enumerate(runtime.classes)},
            "by_predicted_class_interval": {c: rate(flags[predicted == i]) for i, c in enumerate(runtime.classes)},
            "images_per_class": {c: int((labels == i).sum()) for i, c in enumerate(runtime.classes)},
            "per_class_thresholds": det.class_thresholds is not None,
        }
    results["clean_flag_rates"] = flag_rates
    # the trace's plausibility on the same clean images, per true class (docs/design.md §5.10): NaN = no unit qualified
    plaus = outputs["fpr_clean"][2]
    results["clean_plausibility"] = {
        c: {"mean": _nanmean(plaus[labels == i]), "none": float(np.isnan(plaus[labels == i]).mean()),
            "below_0.1": float((np.nan_to_num(plaus[labels == i], nan=0.0) < 0.1).mean())}
        for i, c in enumerate(runtime.classes)}
    if uncalibrated:
        plaus = uncalibrated["fpr_clean"]
        results["clean_plausibility_uncalibrated"] = {
            c: {"mean": _nanmean(plaus[labels == i]), "none": float(np.isnan(plaus[labels == i]).mean()),
                "below_0.1": float((np.nan_to_num(plaus[labels == i], nan=0.0) < 0.1).mean())}
            for i, c in enumerate(runtime.classes)}
    results["best"] = choose_best(results)
    results["seconds"] = {"attacks": round(attack_s, 1), "total": round(time.perf_counter() - started, 1)}
    (out / "detectors.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "detectors.md").write_text(to_markdown(results))
    _roc_figure(scores, [p for p in pools if pools[p].size], out / "roc.png")
    return results


def _nanmean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _verdict(interval) -> str:
    from conceptlens.training.stats import verdict

    return verdict(interval, higher_is_better=True)


def choose_best(results: dict[str, Any]) -> str | None:
    """The candidate (not a raw baseline) with the highest worst-pool AUROC, i.e. the one that holds up on every
    pool, whose per-class clean flag rates stay within 2x the target where possible."""
    best, best_key = None, None
    target = results["target_fpr"]
    for kind, rates in results["clean_flag_rates"].items():
        aucs = [results["auroc"][p].get(kind) for p in results["auroc"]]
        values = [a["value"] for a in aucs if a is not None]
        if not values:
            continue
        worst_class = max(rates["by_class"].values())
        key = (worst_class <= 2 * target, min(values))
        if best_key is None or key > best_key:
            best, best_key = kind, key
    return best


def to_markdown(results: dict[str, Any]) -> str:
    pools = list(results["auroc"])
    lines = [
        f"# Adversarial detectors on {results['bundle']}",
        "",
        f"{results['clean_images']} held-out clean images ({results['data']}, test split; clean accuracy "
        f"{results['clean_accuracy']:.3f}); detectors fitted on {results['fit']} and calibrated on "
        f"{results['calibration']} for a {100 * results['target_fpr']:.0f}% clean flag rate; features from the "
        f"traced layer `{results['layer']}`. AUROC with bootstrap 95% intervals over images.",
        "",
        "| pool | attempted | in pool | flip rate | median ε | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in results["pools"].items():
        eps = "n/a" if p["median_eps"] is None else f"{p['median_eps']:.4f} ({p['median_eps'] * 255:.1f}/255)"
        lines.append(f"| {name} | {p['attempted']} | {p['size']} | {p['flip_rate']:.3f} | {eps} | {p['note']} |")
    lines += ["", "| detector | " + " | ".join(f"AUROC {p}" for p in pools) + " |",
              "| --- | " + " | ".join("---" for _ in pools) + " |"]
    for kind in next(iter(results["auroc"].values()), {}):
        cells = []
        for p in pools:
            a = results["auroc"][p].get(kind)
            cells.append("n/a" if a is None else f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"Difference from {BASELINE} (95% interval; better/worse only when it excludes 0):", ""]
    for p, diffs in results["difference_vs_baseline"].items():
        for kind, d in diffs.items():
            lines.append(f"- {p}, {kind}: {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {d['verdict']}")
    classes = list(next(iter(results["clean_flag_rates"].values()))["by_class"])
    lines += ["", f"Clean flag rate at the calibrated per-class thresholds ({results['fpr_images']} other held-out "
              f"clean images, {results['fpr_data']}, a ShapesWorld seed no fitting or calibration used; overall "
              "with a bootstrap 95% interval, per class with a binomial (Wilson) 95% interval):", ""]
    for title, key in (("by true class", "by_class_interval"), ("by predicted class (what the server thresholds on)",
                                                              "by_predicted_class_interval")):
        lines += [f"Rates {title}:", "", "| detector | overall | " + " | ".join(classes) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in classes) + " |"]
        for kind, r in results["clean_flag_rates"].items():
            o = r["overall"]
            cells = ["n/a" if r[key].get(c) is None else
                     f"{r[key][c]['value']:.3f} [{r[key][c]['low']:.3f}, {r[key][c]['high']:.3f}]" for c in classes]
            lines.append(f"| {kind} | {o['value']:.3f} [{o['low']:.3f}, {o['high']:.3f}] | " + " | ".join(cells) + " |")
        lines.append("")
    rows = [(label, results[key]) for label, key in (
        ("served", "clean_plausibility"), ("uncalibrated", "clean_plausibility_uncalibrated")) if results.get(key)]
    if rows:
        names = list(rows[0][1])
        lines += ["Trace plausibility of the same clean images by true class: mean over traces with a qualifying "
                  "unit, then the share with none, then the share below 0.1 (no unit counted as 0):", "",
                  "| plausibility | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
        for label, table in rows:
            lines.append(f"| {label} | " + " | ".join(
                ("n/a" if table[c]["mean"] is None else f"{table[c]['mean']:.2f}")
                + f" / {table[c]['none']:.2f} / {table[c]['below_0.1']:.2f}" for c in names) + " |")
        lines.append("")
    target = results["target_fpr"]
    within = [k for k, r in results["clean_flag_rates"].items() if max(r["by_class"].values()) <= 2 * target]
    rule = ("among those whose per-class clean flag rates stay within 2x the target" if within else
            f"no candidate keeps every class within 2x the target ({2 * target:.2f})")
    lines += [f"Best candidate (highest worst-pool AUROC; {rule}): **{results['best']}**; in the bundle when "
              f"this ran: {results['shipped_detector']}.", ""]
    return "\n".join(lines)


def _roc_figure(scores: dict[str, dict[str, np.ndarray]], pools: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptlens.training.stats import roc_curve

    fig, axes = plt.subplots(1, max(1, len(pools)), figsize=(5 * max(1, len(pools)), 4.5), squeeze=False)
    for ax, pool in zip(axes[0], pools, strict=False):
        for kind in scores["clean"]:
            fpr, tpr = roc_curve(scores["clean"][kind], scores[pool][kind])
            ax.plot(fpr, tpr, label=kind, linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=0.8)
        ax.set(title=f"clean vs {pool}", xlabel="false-positive rate", ylabel="true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
