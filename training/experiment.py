"""The paper's comparison (Dong et al.), measured so it can decide (issue 13): regimes trained from one base config
over several seeds, every metric with a bootstrap 95% interval, adversarial pools whose flip rates are reported,
and the adversarial detectors compared per regime.

Regimes (all from one base config by overrides, so data, epochs, optimiser, ε and attack steps are identical):
standard, PGD-AT (λ = 0), consistent (λ), CSG (class-specific gates on standard training, `training/csg.py`) and
CSG + consistent; optional sweeps add consistent regimes at other λ and with the consistency term on other layer
sets. Per regime and seed:

1. train; clean accuracy on held-out images (per image) and robust accuracy under untargeted PGD at the training ε;
2. dissect the probe images (`training/dissect`) with its own targeted PGD, whose success rate is reported as the
   pool's flip rate ("targeted PGD success at dissection"): per-unit consistency (real, real ∪ adv), MIS, label
   stability, mean r;
3. white-box pool: each probe image at its minimal flipping ε against this model (`pools.minimal_eps_pool`), flip
   rate within the cap, and consistency on real ∪ that pool (only images that flip);
4. the shared pool (the paper's way): made once per experiment by the ensemble-optimisation attack against held-out
   surrogate models trained only for it (never evaluated), shown to every model: how often each one is fooled, and
   consistency on real ∪ shared pool.

Seed 0 of each regime is exported and its detectors compared (`training/detector_eval.py`). Intervals: bootstrap
over seeds, then units or images within each seed (`training/stats.py`); "better"/"worse" only when the interval of
the difference excludes 0.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REGIMES: dict[str, list[str]] = {
    "standard": ["attack.name=none"],
    "pgd_at": ["attack.name=pgd", "loss.consistency_weight=0"],
    "consistent": ["attack.name=pgd"],  # consistency_weight = λ, added below
    "csg": ["attack.name=none"],  # loss.csg_weight added below
    "csg_consistent": ["attack.name=pgd"],  # λ and loss.csg_weight added below
}
SURROGATES: list[list[str]] = [["attack.name=none"], ["attack.name=pgd", "loss.consistency_weight=0"]]
QUICK = [
    "data.train=shapes:64", "data.val=shapes:32", "data.batch_size=32", "model.input_size=32", "run.epochs=2",
    "attack.steps=1", "eval.robust_n=16", "eval.steps=2", "eval.batch_size=32", "run.progress=false",
    "optim.warmup_fraction=0.5",  # one-cycle needs a warm-up of at least one step of the 4
]
# metric key -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "clean_accuracy": ("clean accuracy", True),
    "robust_accuracy": ("robust accuracy (PGD, training ε)", True),
    "consistency_real": ("consistency pᵀAp, real", True),
    "consistency_all": ("consistency, real ∪ dissection PGD", True),
    "consistency_white_box": ("consistency, real ∪ white-box min-ε pool", True),
    "consistency_shared": ("consistency, real ∪ shared transfer pool", True),
    "r_mean": ("mean r (< 0.5 = follows the look)", False),
    "label_stability": ("label stability", True),
    "mis": ("MIS (nats)", True),
    "feature_gap": ("representation gap ‖φ(x) − φ(x*)‖² / ‖φ(x)‖², PGD at training ε", False),
}
# metrics measured on the dissection's own targeted PGD images, whose success rate is reported beside them
ON_DISSECTION_PGD = ("consistency_all", "label_stability", "r_mean")
POOL_METRICS = ("dissect_attack_success", "white_box_flip_rate", "white_box_median_eps", "shared_pool_flip",
                "shared_pool_target_hit")
COMPARISONS = [("consistent", "pgd_at"), ("pgd_at", "standard"), ("csg", "standard"), ("csg_consistent", "consistent")]


@dataclass(frozen=True)
class ExperimentConfig:
    out: Path
    base_config: Path | None = None  # TOML; None = the trainer's defaults
    overrides: tuple[str, ...] = ()
    lam: float = 1.0
    csg_weight: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    probe_images: int = 500
    probe_seed: int = 12345
    attack_steps: int = 10
    pool_images: int = 90  # white-box and shared pools, robust accuracy
    test_images: int = 900  # clean accuracy
    eps_cap: float = 32 / 255
    shared_eps: float = 16 / 255
    batch_size: int = 64
    layers: tuple[str, ...] = ()
    regimes: tuple[str, ...] = tuple(REGIMES)
    lambdas: tuple[float, ...] = ()  # sweep: extra consistent regimes "consistent_lam<λ>"
    layer_sets: tuple[tuple[str, ...], ...] = ()  # sweep: extra consistent regimes "consistent_on_<layers>"
    detectors: bool = True
    detector_images: int = 90
    resamples: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


def regime_overrides(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Every regime the experiment trains, with its overrides on top of the base config."""
    out: dict[str, list[str]] = {}
    for regime in cfg.regimes:
        extra = list(REGIMES[regime])
        if regime in ("consistent", "csg_consistent"):
            extra.append(f"loss.consistency_weight={cfg.lam}")
        if regime.startswith("csg"):
            extra.append(f"loss.csg_weight={cfg.csg_weight}")
        out[regime] = extra
    for lam in cfg.lambdas:
        out[f"consistent_lam{lam:g}"] = ["attack.name=pgd", f"loss.consistency_weight={lam}"]
    for layers in cfg.layer_sets:
        quoted = ", ".join(f'"{name}"' for name in layers)
        out[f"consistent_on_{'+'.join(layers)}"] = ["attack.name=pgd", f"loss.consistency_weight={cfg.lam}",
                                                    f"loss.layers=[{quoted}]"]
    return out


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train, dissect, attack and compare every regime over every seed; write results.json, results.md and the
    figures into `cfg.out`; return the results."""
    import torch

    from conceptlens.training import config as train_config
    from conceptlens.training import pools as P
    from conceptlens.training.data.registry import open_concepts, open_dataset

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.quick:
        cfg = replace(cfg, probe_images=min(cfg.probe_images, 48), pool_images=min(cfg.pool_images, 12),
                      test_images=min(cfg.test_images, 64), detector_images=min(cfg.detector_images, 9),
                      attack_steps=2, resamples=min(cfg.resamples, 200))
    common = [*(QUICK if cfg.quick else []), *cfg.overrides]
    regimes = regime_overrides(cfg)
    base = train_config.load(cfg.base_config, [*common, "attack.name=pgd"])
    size, eps = base.model.input_size, base.attack.eps
    # three disjoint ShapesWorld sets through the one spec grammar (docs/design.md §4.1): the probe set is what
    # `conceptlens dissect --data shapes:N:SEED` reads (val split), the pool and test sets its other two splits
    probe, _ = open_concepts(f"shapes:{cfg.probe_images}:{cfg.probe_seed}", size)
    pool_set = open_dataset(f"shapes:{cfg.pool_images}:{cfg.probe_seed}", "train", size=size)
    pool_x = torch.stack([pool_set[i][0] for i in range(len(pool_set))])
    pool_y = torch.tensor([pool_set[i][1] for i in range(len(pool_set))])
    test_set = open_dataset(f"shapes:{cfg.test_images}:{cfg.probe_seed}", "test", size=size)
    test_x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    test_y = torch.tensor([test_set[i][1] for i in range(len(test_set))])

    # the shared pool: once, against held-out surrogates trained only for it
    surrogates = [_train(train_config.load(cfg.base_config, [*common, *o, f"run.seed={1000 + i}"]),
                         out / "runs" / "surrogates" / f"s{i}") for i, o in enumerate(SURROGATES)]
    t0 = time.perf_counter()
    shared, shared_targets = P.transfer_pool(surrogates, pool_x, pool_y, eps=cfg.shared_eps, steps=cfg.attack_steps,
                                             ghosts=1, seed=cfg.probe_seed)
    shared_s = time.perf_counter() - t0

    settings = {
        "seeds": list(cfg.seeds), "lambda": cfg.lam, "csg_weight": cfg.csg_weight, "quick": cfg.quick,
        "probe_images": cfg.probe_images, "probe_seed": cfg.probe_seed, "dissect_eps": eps,
        "dissect_steps": cfg.attack_steps, "pool_images": cfg.pool_images, "test_images": cfg.test_images,
        "eps_cap": cfg.eps_cap, "shared_eps": cfg.shared_eps, "surrogates": len(surrogates),
        "base_config": str(cfg.base_config) if cfg.base_config else None, "overrides": common,
        "regimes": {k: v for k, v in regimes.items()}, "resamples": cfg.resamples,
    }
    per_seed: dict[str, list[dict[str, Any]]] = {regime: [] for regime in regimes}
    detector_tables: dict[str, Any] = {}
    # seed-major: an interrupted run has every regime at its first seeds, and results.json after every model
    for seed in cfg.seeds:
        for regime, extra in regimes.items():
            tc = train_config.load(cfg.base_config, [*common, *extra, f"run.seed={seed}"])
            run_dir = out / "runs" / regime / f"seed{seed}"
            model = _train(tc, run_dir)
            t = time.perf_counter()
            row = _measure(model, tc, cfg, probe, pool_x, pool_y, test_x, test_y, shared, shared_targets, eps,
                           out / "dissect" / regime / f"seed{seed}", gap_layers=train_config.traced_layers(base))
            row["seed"], row["train_seconds"] = seed, _train_seconds(run_dir)
            row["measure_seconds"] = round(time.perf_counter() - t, 1)
            per_seed[regime].append(row)
            log.info("%s seed %d: clean %.3f, robust %.3f, white-box flip rate %.3f, shared pool flip %.3f", regime,
                     seed, np.mean(row["clean_correct"]), np.mean(row["robust_correct"]), row["white_box_flip_rate"],
                     row["shared_pool_flip"])
            if cfg.detectors and seed == cfg.seeds[0]:
                detector_tables[regime] = _detectors(model, run_dir, out, regime, cfg)
            partial = summarize({r: rows for r, rows in per_seed.items() if rows}, cfg, detector_tables)
            partial["settings"] = {**settings, "complete": False,
                                   "seeds_done": {r: [row["seed"] for row in rows] for r, rows in per_seed.items()}}
            (out / "results.json").write_text(json.dumps(partial, indent=1) + "\n")
            (out / "results.md").write_text(to_markdown(partial))
    results = summarize(per_seed, cfg, detector_tables)
    results["settings"] = {**settings, "complete": True}
    results["shared_pool"] = {"images": shared.attempted, "ensemble_success": shared.note,
                              "seconds": round(shared_s, 1)}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    # a resumed run reuses finished trainings, so its wall time undercounts: the sum of every step's own time
    # (each training's epochs as the trainer logged them, each model's measurement, the surrogates and the
    # shared pool) is what one uninterrupted run would take on this machine
    surrogate_s = sum(_train_seconds(run) for run in (out / "runs" / "surrogates").glob("s*"))
    model_s = sum(row["train_seconds"] + row["measure_seconds"] for rows in per_seed.values() for row in rows)
    results["compute_seconds"] = round(surrogate_s + shared_s + model_s, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figures = write_figures(results, out / "figures")
    results["figures"] = [str(p.relative_to(out)) for p in figures]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(to_markdown(results))
    return results


def _train(tc: Any, run_dir: Path) -> Any:
    """Train into `run_dir`, reuse the run finished there, or continue the one an interrupted experiment left
    (from its last checkpoint; same config, since the folder is named by regime and seed like every reused run)."""
    from conceptlens.training import checkpoint
    from conceptlens.training.run import load_run
    from conceptlens.training.trainer import train

    if (run_dir / "run.json").is_file():
        log.info("reusing the finished run in %s", run_dir)
    elif (run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST).is_file():
        log.info("continuing the interrupted run in %s", run_dir)
        train(tc, run_dir, resume=True)
    else:
        train(tc, run_dir)
    return load_run(run_dir).eval()


def _train_seconds(run_dir: Path) -> float:
    """The training time the trainer logged for `run_dir` (sum of its epochs), also for a reused run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return round(sum(r.get("train_seconds", 0.0) for r in rows if r.get("kind") == "epoch"), 1)


def _measure(model, tc, cfg: ExperimentConfig, probe, pool_x, pool_y, test_x, test_y, shared, shared_targets,
             eps: float, report_dir: Path, gap_layers: Sequence[str]) -> dict[str, Any]:
    """One trained model's per-unit and per-image measurements (lists, so intervals can resample them)."""
    import torch

    from conceptlens.handlers.attacks import PGD
    from conceptlens.handlers.zoo import arch_spec
    from conceptlens.training import pools as P
    from conceptlens.training.dissect.engine import DissectConfig, dissect
    from conceptlens.training.dissect.report import write_report

    layers = cfg.layers or tuple(arch_spec(model.arch).default_layers)
    top_k = min(50, max(1, len(probe) // 4))  # a top pool holding every image says nothing
    dcfg = DissectConfig(layers=tuple(layers), adversarial=True, eps=eps, steps=cfg.attack_steps,
                         batch_size=cfg.batch_size, top_k=top_k)
    result = dissect(model, probe, dcfg)
    write_report(result, report_dir, model=model, dataset=probe,
                 model_info={"architecture": model.arch, "regime": tc.regime},
                 data_info={"source": f"shapes:{len(probe)}:{cfg.probe_seed}", "images": len(probe)})
    row: dict[str, Any] = {"units": {}}
    for name, lr in result.layers.items():
        m = lr.metrics
        row["units"][name] = {"consistency_real": m.get("consistency_real_per_unit"),
                              "consistency_all": m.get("consistency_all_per_unit"), "mis": m.get("mis_per_unit")}
        row.setdefault("label_stability", []).append(m.get("label_stability", {}).get("stable_fraction"))
        row.setdefault("r_mean", []).append(m.get("r_mean"))
        row.setdefault("unique_detectors", {})[name] = m["unique_detectors"]["all"]
    row["dissect_attack_success"] = result.attack.get("success_rate")
    logits = P.predict(model, test_x)
    row["clean_correct"] = (logits.argmax(1) == test_y).float().tolist()
    robust = PGD(model, eps=eps, steps=cfg.attack_steps, random_start=False)(pool_x, pool_y)  # true labels
    row["robust_correct"] = (~robust.success.cpu()).float().tolist()
    row["feature_gap"] = _feature_gap(model, gap_layers, pool_x, robust.adv)
    white = P.minimal_eps_pool(model, pool_x, eps_cap=cfg.eps_cap, steps=cfg.attack_steps)
    row["white_box_flip_rate"] = white.flip_rate
    row["white_box_median_eps"] = white.summary()["median_eps"]
    row["white_box_note"] = white.note
    fooled = P.fooled_rate(model, pool_x, shared, shared_targets)
    row["shared_pool_flip"], row["shared_pool_target_hit"] = fooled["flip"], fooled.get("target_hit")
    real = _peaks(model, layers, torch.stack([probe[i][0] for i in range(len(probe))]))
    real_cls = torch.tensor([probe[i][1] for i in range(len(probe))])
    n_cls = len(model.classes)
    for key, pool, classes in (("consistency_white_box", white, pool_y), ("consistency_shared", shared, pool_y)):
        adv = _peaks(model, layers, pool.adv) if pool.size else None
        for name in layers:
            cls = classes[torch.as_tensor(pool.source)] if pool.size else None
            row["units"][name][key] = _pool_consistency(real[name], real_cls, None if adv is None else adv[name],
                                                        cls, top_k, n_cls)
    return row


def _peaks(model, layers: Sequence[str], images) -> dict[str, Any]:
    """max over positions of every unit of `layers`, (n, units) per layer."""
    import torch

    from conceptlens.handlers.hooks import capture
    from conceptlens.handlers.modes import eval_mode

    out: dict[str, list] = {name: [] for name in layers}
    with eval_mode(model), torch.no_grad(), capture(model, layers, detach=True) as acts:
        for i in range(0, len(images), 128):
            model(images[i : i + 128])
            for name in layers:
                out[name].append(acts[name].amax((2, 3)).cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def _feature_gap(model, layers: Sequence[str], clean, adv) -> list[float]:
    """Per image, Σ over `layers` of ‖φ(x) − φ(x*)‖² / ‖φ(x)‖² (docs/design.md §5.6): what the consistency term
    minimises (`training/losses.relative_squared`), measured on held-out images so every regime can be compared
    on what the consistent loss is supposed to change."""
    import torch

    from conceptlens.handlers.hooks import capture
    from conceptlens.handlers.modes import eval_mode

    with eval_mode(model), torch.no_grad(), capture(model, layers, detach=True) as acts:
        model(clean)
        real = {name: acts[name].flatten(1).float() for name in layers}
        model(adv.to(clean.device))
        gap = sum(((real[n] - acts[n].flatten(1).float()).pow(2).sum(1) / real[n].pow(2).sum(1).clamp_min(1e-12))
                  for n in layers)
    return gap.cpu().tolist()


def _pool_consistency(real, real_cls, adv, adv_cls, k: int, n_cls: int) -> list[float]:
    """Per-unit pᵀAp (A = I) of the top-k images of real ∪ adversarial (an adversarial image keeps its source's
    class), the definition `training/dissect` uses; the real pool alone when there is no adversarial image."""
    import torch

    from conceptlens.training.dissect.metrics import TopKPool, unit_consistency

    pool = TopKPool(real.shape[1], k)
    pool.update(real, torch.arange(len(real)), real_cls)
    if adv is not None and len(adv):
        other = TopKPool(real.shape[1], k)
        other.update(adv, torch.arange(len(adv)) + len(real), adv_cls)
        pool = TopKPool.merged(pool, other)
    return unit_consistency(pool.classes, n_cls).tolist()


def _detectors(model, run_dir: Path, out: Path, regime: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """Export the model with its dissection (unit labels, co-occurrence) and compare the detectors on it."""
    from conceptlens.training.detector_eval import DetectorEvalConfig, evaluate_detectors
    from conceptlens.training.export import export_bundle

    dissection = out / "dissect" / regime / f"seed{cfg.seeds[0]}"
    bundle = export_bundle(model, out / "bundles" / regime / "1", name=regime, version=1,
                           dissection=dissection, overwrite=True)
    train_spec = json.loads((run_dir / "run.json").read_text()).get("config", {}).get("data", {}).get("train")
    n = cfg.detector_images
    res = evaluate_detectors(DetectorEvalConfig(
        bundle=bundle, out=out / "detectors" / regime, data=f"shapes:{n}:2000", fpr_data=f"shapes:{4 * n}:3000",
        calibration=f"shapes:{max(40, 2 * n)}:1000", fit=train_spec, eps_cap=cfg.eps_cap, steps=cfg.attack_steps,
        confident_schedule=(16 / 255, 32 / 255, 64 / 255), resamples=cfg.resamples))
    return {"auroc": res["auroc"], "pools": res["pools"], "best": res["best"],
            "difference_vs_baseline": res["difference_vs_baseline"],
            "clean_flag_rate": {k: v["overall"] for k, v in res["clean_flag_rates"].items()},
            "roc": str(Path("detectors") / regime / "roc.png")}


# --- statistics and output -----------------------------------------------------------------------------------


def _groups(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """Per-seed lists of the values behind `key`: per-unit values over all layers, per-image values, or one scalar."""
    groups = []
    for row in rows:
        if key in ("clean_accuracy", "robust_accuracy"):
            values = row["clean_correct" if key == "clean_accuracy" else "robust_correct"]
        elif key == "feature_gap":
            values = row.get(key) or []
        elif key in ("label_stability", "r_mean"):
            values = [v for v in row[key] if v is not None]
        elif key in POOL_METRICS:
            values = [row[key]] if row.get(key) is not None else []
        else:
            values = [v for layer in row["units"].values() for v in (layer.get(key) or [])]
        groups.append([float(v) for v in values if v is not None and math.isfinite(float(v))])
    return [g for g in groups if g]


def summarize(per_seed: dict[str, list[dict[str, Any]]], cfg: ExperimentConfig,
              detector_tables: dict[str, Any]) -> dict[str, Any]:
    """Mean and 95% interval of every metric per regime, and the verdict of each planned comparison."""
    from conceptlens.training.stats import bootstrap_difference, bootstrap_mean, verdict

    regimes: dict[str, Any] = {}
    for regime, rows in per_seed.items():
        entry: dict[str, Any] = {}
        for key in (*METRICS, *POOL_METRICS):
            groups = _groups(rows, key)
            entry[key] = bootstrap_mean(groups, resamples=cfg.resamples).to_json() if groups else None
            entry[key + "_per_seed"] = [float(np.mean(g)) for g in groups]
        entry["unique_detectors"] = [row["unique_detectors"] for row in rows]
        entry["white_box_notes"] = sorted({row["white_box_note"] for row in rows if row["white_box_note"]})
        entry["train_seconds"] = [row["train_seconds"] for row in rows]
        regimes[regime] = entry
    comparisons = []
    pairs = [p for p in COMPARISONS if p[0] in per_seed and p[1] in per_seed]
    pairs += [(r, "pgd_at") for r in per_seed if r.startswith("consistent_") and "pgd_at" in per_seed]
    for a, b in pairs:
        for key, (label, higher) in METRICS.items():
            ga, gb = _groups(per_seed[a], key), _groups(per_seed[b], key)
            if not ga or not gb:
                continue
            diff = bootstrap_difference(ga, gb, resamples=cfg.resamples)
            comparisons.append({"a": a, "b": b, "metric": key, "label": label, **diff.to_json(),
                                "verdict": verdict(diff, higher_is_better=higher)})
    return {"regimes": regimes, "comparisons": comparisons, "detectors": detector_tables}


def _compute_note(results: dict[str, Any]) -> str:
    seconds, wall = results.get("compute_seconds"), results.get("wall_seconds")
    if seconds is None or wall is None or wall >= seconds:
        return ""  # one uninterrupted run (its wall time also covers data and pools): the wall time is the figure
    return (f" (this run reused finished trainings; every step's own time summed, i.e. one uninterrupted run on "
            f"this machine: {seconds / 60:.0f} min)")


def _cell(interval: dict[str, float] | None) -> str:
    if not interval or interval.get("value") is None or not math.isfinite(interval["value"]):
        return "n/a"
    if not math.isfinite(interval.get("low", float("nan"))):
        return f"{interval['value']:.3f}"
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def to_markdown(results: dict[str, Any]) -> str:
    regimes = list(results["regimes"])
    s = results.get("settings", {})
    lines = [
        "# ConceptLens: the paper's comparison on ShapesWorld",
        "",
        f"Seeds {s.get('seeds')}; λ = {s.get('lambda')}; CSG weight {s.get('csg_weight')}; quick = {s.get('quick')}; "
        f"{s.get('probe_images')} probe images dissected (targeted PGD, ε = {s.get('dissect_eps', 0):.4f}, "
        f"{s.get('dissect_steps')} steps); {s.get('pool_images')} pool images (white-box min-ε cap "
        f"{s.get('eps_cap', 0) * 255:.0f}/255; shared transfer pool at ε = {s.get('shared_eps', 0) * 255:.0f}/255 "
        f"against {s.get('surrogates')} held-out surrogates); {s.get('test_images')} test images. Mean with a "
        f"bootstrap 95% interval over seeds and units/images. Wall time {results.get('wall_seconds')} s"
        f"{_compute_note(results)}. "
        f"Training overrides: `{' '.join(s.get('overrides', []))}`.",
        "",
        "| metric | " + " | ".join(regimes) + " |",
        "| --- | " + " | ".join("---" for _ in regimes) + " |",
    ]
    if s.get("complete") is False:
        done = "; ".join(f"{r}: {seeds}" for r, seeds in s.get("seeds_done", {}).items())
        lines[2:2] = [f"**Partial results, the run is not finished.** Seeds measured so far: {done}.", ""]
    weak = _rarely_flipped(results, regimes, "dissect_attack_success")
    transfers_failed = _rarely_flipped(results, regimes, "shared_pool_flip")
    for key, (label, _) in METRICS.items():
        mark = " †" if key in ON_DISSECTION_PGD else " ‡" if key == "consistency_shared" and transfers_failed else ""
        lines.append(f"| {label}{mark} | " + " | ".join(_cell(results["regimes"][r].get(key)) for r in regimes) + " |")
    lines += ["", "† measured on the dissection's own targeted PGD images (ε as in training)"
              + (f", which changed the prediction on only {', '.join(weak)} of the probe images: for those regimes "
                 "these rows compare real images with perturbed ones that are mostly failed attacks, not with "
                 "adversarial examples; the white-box rows are the ones made of attacks that flipped the evaluated "
                 "model (their flip rates below)." if weak else ".")]
    if transfers_failed:  # the pool's images fooled the surrogates, which says nothing of the evaluated model
        lines += ["", "‡ the shared transfer pool fooled the surrogates it was made against, but changed the "
                  f"evaluated model's prediction on only {', '.join(transfers_failed)} of its images: for those "
                  "regimes this row compares real images with transfers that mostly failed."]
    lines += ["", "## Adversarial pools: how often the attacks did what they claim", "",
              "| pool | " + " | ".join(regimes) + " |", "| --- | " + " | ".join("---" for _ in regimes) + " |"]
    pool_labels = {"dissect_attack_success": "targeted PGD success at dissection",
                   "white_box_flip_rate": "white-box min-ε pool: flip rate within the cap",
                   "white_box_median_eps": "white-box min-ε pool: median ε",
                   "shared_pool_flip": "shared transfer pool: prediction flipped",
                   "shared_pool_target_hit": "shared transfer pool: moved to the target class"}
    for key, label in pool_labels.items():
        lines.append(f"| {label} | " + " | ".join(_cell(results["regimes"][r].get(key)) for r in regimes) + " |")
    notes = {r: results["regimes"][r]["white_box_notes"] for r in regimes if results["regimes"][r]["white_box_notes"]}
    for r, n in notes.items():
        lines.append(f"\n{r}: {'; '.join(n)}")
    if results.get("comparisons"):
        lines += ["", "## Comparisons (difference with its 95% interval; better/worse only when it excludes 0)", ""]
        for c in results["comparisons"]:
            lines.append(f"- {c['a']} vs {c['b']}, {c['label']}: {c['value']:+.3f} [{c['low']:+.3f}, "
                         f"{c['high']:+.3f}], {c['verdict']}")
    if results.get("detectors"):
        lines += ["", "## Adversarial detectors (seed 0 of each regime; AUROC clean vs pool, 95% interval)", ""]
        for regime, table in results["detectors"].items():
            pools = list(table["auroc"])
            lines += [f"### {regime} (best: {table['best']}; ROC curves: {table['roc']})", "",
                      "| detector | " + " | ".join(f"{p} (n = {table['pools'][p]['size']}, flip rate "
                                                     f"{table['pools'][p]['flip_rate']:.2f})" for p in pools) + " |",
                      "| --- | " + " | ".join("---" for _ in pools) + " |"]
            for kind in next(iter(table["auroc"].values()), {}):
                lines.append(f"| {kind} | " + " | ".join(_cell(table["auroc"][p].get(kind)) for p in pools) + " |")
            lines.append("")
    if results.get("figures"):
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in results["figures"]), ""]
    lines.append("")
    return "\n".join(lines)


def _rarely_flipped(results: dict[str, Any], regimes: list[str], pool_metric: str) -> list[str]:
    """'regime rate' for each regime whose pool changed fewer than half of its predictions."""
    rates = {r: (results["regimes"][r].get(pool_metric) or {}).get("value") for r in regimes}
    return [f"{r} {v:.1%}" for r, v in rates.items() if v is not None and v < 0.5]


def write_figures(results: dict[str, Any], folder: Path) -> list[Path]:
    """Per-metric bars with their intervals, one bar per regime; the detector ROC curves stay beside each regime's
    detector table (detectors/<regime>/roc.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    regimes = list(results["regimes"])
    keys = [k for k in (*METRICS, "white_box_flip_rate", "shared_pool_flip")
            if any(results["regimes"][r].get(k) for r in regimes)]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        values, lows, highs = [], [], []
        for r in regimes:
            cell = results["regimes"][r].get(key) or {}
            v = cell.get("value", float("nan"))
            values.append(v)
            lows.append(v - cell.get("low", v) if math.isfinite(cell.get("low", float("nan"))) else 0)
            highs.append(cell.get("high", v) - v if math.isfinite(cell.get("high", float("nan"))) else 0)
        ax.bar(range(len(regimes)), values, yerr=[lows, highs], capsize=3, color="#4C72B0")
        ax.set_xticks(range(len(regimes)), regimes, rotation=30, ha="right", fontsize=7)
        ax.set_title(METRICS.get(key, (key,))[0], fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = folder / "metrics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
