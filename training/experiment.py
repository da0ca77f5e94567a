"""The paper's comparison (Dong et al.): standard vs PGD-AT (λ = 0) vs consistent-loss training on ShapesWorld,
same budget, each dissected on the same probe images with the same targeted PGD.

All three configs come from one base config by overrides, so data, epochs, optimiser, seed, ε and attack steps
are identical; only `attack.name` (none for standard) and `loss.consistency_weight` (0 for PGD-AT) differ.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REGIMES: dict[str, list[str]] = {
    "standard": ["attack.name=none"],
    "pgd_at": ["attack.name=pgd", "loss.consistency_weight=0"],
    "consistent": ["attack.name=pgd"],  # consistency_weight = λ, added below
}
QUICK = [
    "data.train=shapes:64", "data.val=shapes:32", "data.batch_size=32", "model.input_size=32", "run.epochs=1",
    "attack.steps=1", "eval.robust_n=16", "eval.steps=2", "eval.batch_size=32", "run.progress=false",
]


@dataclass(frozen=True)
class ExperimentConfig:
    out: Path
    base_config: Path | None = None  # TOML; None = the trainer's defaults
    overrides: tuple[str, ...] = ()
    lam: float = 1.0
    quick: bool = False
    probe_images: int = 500
    probe_seed: int = 12345
    attack_steps: int = 10
    batch_size: int = 64
    layers: tuple[str, ...] = ()
    regimes: tuple[str, ...] = tuple(REGIMES)
    extra: dict[str, Any] = field(default_factory=dict)


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train, dissect and compare the regimes; write results.json and results.md into `cfg.out`."""
    from conceptlens.handlers.zoo import arch_spec
    from conceptlens.training import config as train_config
    from conceptlens.training.data.registry import open_concepts
    from conceptlens.training.dissect.engine import DissectConfig, dissect
    from conceptlens.training.dissect.report import write_report
    from conceptlens.training.run import load_run, read_run
    from conceptlens.training.trainer import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*(QUICK if cfg.quick else []), *cfg.overrides]
    results: dict[str, Any] = {"regimes": {}, "settings": {}}
    for regime in cfg.regimes:
        overrides = [*common, *REGIMES[regime]]
        if regime == "consistent":
            overrides.append(f"loss.consistency_weight={cfg.lam}")
        tc = train_config.load(cfg.base_config, overrides)
        run_dir = out / "runs" / regime
        started = time.perf_counter()
        if (run_dir / "run.json").is_file():
            log.info("%s: reusing the finished run in %s", regime, run_dir)
        else:
            train(tc, run_dir)
        train_s = time.perf_counter() - started
        meta = read_run(run_dir)
        model = load_run(run_dir)
        layers = cfg.layers or tuple(meta.get("layers") or arch_spec(model.arch).default_layers)
        n_probe = 48 if cfg.quick else cfg.probe_images
        probe, _ = open_concepts(f"shapes:{n_probe}:{cfg.probe_seed}", model.input_size)  # what dissect reads
        eps = tc.attack.eps if tc.attack.name != "none" else _base_eps(cfg, common)
        dcfg = DissectConfig(layers=tuple(layers), adversarial=True, eps=eps,
                             steps=2 if cfg.quick else cfg.attack_steps, batch_size=cfg.batch_size,
                             top_k=min(50, max(1, n_probe // 4)))  # a top pool of every image says nothing
        started = time.perf_counter()
        result = dissect(model, probe, dcfg)
        dissect_s = time.perf_counter() - started
        write_report(result, out / "dissect" / regime, model=model, dataset=probe,
                     model_info={"architecture": model.arch, "regime": regime, "run": str(run_dir)},
                     data_info={"source": f"shapes:{n_probe}:{cfg.probe_seed}", "images": n_probe})
        results["regimes"][regime] = _row(meta, result, train_s, dissect_s)
        results["settings"] = {"probe_images": n_probe, "probe_seed": cfg.probe_seed, "dissect_eps": eps,
                               "dissect_steps": dcfg.steps, "lambda": cfg.lam, "quick": cfg.quick,
                               "base_config": str(cfg.base_config) if cfg.base_config else None,
                               "overrides": common, "layers": list(layers)}
        log.info("%s: %s", regime, {k: v for k, v in results["regimes"][regime].items() if k != "layers"})
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(to_markdown(results))
    return results


def _base_eps(cfg: ExperimentConfig, common: Sequence[str]) -> float:
    from conceptlens.training import config as train_config

    return train_config.load(cfg.base_config, [*common, "attack.name=pgd"]).attack.eps


def _row(meta: dict[str, Any], result: Any, train_s: float, dissect_s: float) -> dict[str, Any]:
    metrics = meta.get("metrics") or {}
    layers = {}
    for name, lr in result.layers.items():
        m = lr.metrics
        layers[name] = {
            "unique_detectors": m["unique_detectors"]["all"],
            "detectors": m["detectors"],
            "consistency_real": m.get("consistency_real"),
            "consistency_all": m.get("consistency_all"),
            "r_mean": m.get("r_mean"),
            "label_stability": m.get("label_stability", {}).get("stable_fraction"),
            "iou_drop": m.get("label_stability", {}).get("mean_iou_drop"),
            "mis": m.get("mis"),
        }
    return {
        "clean_accuracy": metrics.get("clean_accuracy"),
        "robust_accuracy": metrics.get("robust_accuracy"),
        "attack_success_dissect": result.attack.get("success_rate"),
        "unique_detectors": {n: v["unique_detectors"] for n, v in layers.items()},
        "consistency_real": _mean(v["consistency_real"] for v in layers.values()),
        "consistency_all": _mean(v["consistency_all"] for v in layers.values()),
        "r_mean": _mean(v["r_mean"] for v in layers.values()),
        "label_stability": _mean(v["label_stability"] for v in layers.values()),
        "mis": _mean(v["mis"] for v in layers.values()),
        "train_seconds": round(train_s, 1),
        "dissect_seconds": round(dissect_s, 1),
        "layers": layers,
    }


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


ROWS = [
    ("clean accuracy", "clean_accuracy", "higher"),
    ("robust accuracy (PGD)", "robust_accuracy", "higher"),
    ("consis, real (mean over layers)", "consistency_real", "higher"),
    ("consis, real ∪ adv", "consistency_all", "higher"),
    ("mean r (< 0.5 = follows the look)", "r_mean", "lower"),
    ("label stability (detectors unchanged)", "label_stability", "higher"),
    ("MIS (class specificity, nats)", "mis", "higher"),
    ("targeted PGD success at dissection", "attack_success_dissect", "lower"),
]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def to_markdown(results: dict[str, Any]) -> str:
    regimes = list(results["regimes"])
    s = results["settings"]
    lines = [
        "# ConceptLens: the paper's comparison on ShapesWorld",
        "",
        f"Probe set: {s.get('probe_images')} ShapesWorld images (seed {s.get('probe_seed')}); adversarial pool and "
        f"r from targeted PGD (ε = {s.get('dissect_eps', 0):.4f}, {s.get('dissect_steps')} steps); λ = "
        f"{s.get('lambda')}; quick = {s.get('quick')}. Training overrides: `{' '.join(s.get('overrides', []))}`.",
        "",
        "| metric | " + " | ".join(regimes) + " |",
        "| --- | " + " | ".join("---" for _ in regimes) + " |",
    ]
    for label, key, _ in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(results["regimes"][r].get(key)) for r in regimes) + " |")
    layer_names = list(next(iter(results["regimes"].values()))["layers"]) if regimes else []
    for layer in layer_names:
        lines.append(f"| unique detectors, {layer} | " + " | ".join(
            _cell(results["regimes"][r]["layers"][layer]["unique_detectors"]) for r in regimes) + " |")
    lines.append("| train / dissect seconds | " + " | ".join(
        f"{results['regimes'][r]['train_seconds']} / {results['regimes'][r]['dissect_seconds']}" for r in regimes)
        + " |")
    if "consistent" in regimes and "pgd_at" in regimes:
        lines += ["", "## Consistent loss vs PGD-AT (λ = 0), as measured", ""]
        a, b = results["regimes"]["consistent"], results["regimes"]["pgd_at"]
        for label, key, better in ROWS:
            va, vb = a.get(key), b.get(key)
            if va is None or vb is None:
                continue
            delta = va - vb
            verdict = "same" if abs(delta) < 5e-4 else (
                "better" if (delta > 0) == (better == "higher") else "worse")
            lines.append(f"- {label}: {_cell(va)} vs {_cell(vb)} ({delta:+.3f}, {verdict})")
    lines.append("")
    return "\n".join(lines)
