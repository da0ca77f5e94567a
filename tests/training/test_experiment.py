"""`conceptlens experiment paper --quick`: regimes over two seeds, each metric with an interval, pools with their
flip rates, comparisons with verdicts, the detector tables and the figures; bad arguments are one-line errors."""

from __future__ import annotations

import json

import pytest

from conceptlens.cli import main


@pytest.mark.slow
def test_experiment_paper_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "paper", "--out", str(out), "--quick", "--seeds", "0,1",
                 "--regimes", "pgd_at,consistent,csg", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert printed == results
    assert results["settings"]["complete"] is True  # the results written after each model were partial
    assert list(results["regimes"]) == ["pgd_at", "consistent", "csg"]
    for regime, row in results["regimes"].items():
        for key in ("clean_accuracy", "robust_accuracy", "consistency_real", "consistency_all",
                    "consistency_white_box", "consistency_shared", "label_stability", "mis", "feature_gap"):
            cell = row[key]
            assert cell["low"] <= cell["value"] <= cell["high"], (regime, key)
            assert len(row[key + "_per_seed"]) == 2, (regime, key)
        for key in ("white_box_flip_rate", "shared_pool_flip", "dissect_attack_success"):
            assert 0 <= row[key]["value"] <= 1, (regime, key)  # computed from the attacks, every seed
        assert (out / "dissect" / regime / "seed1" / "report.html").is_file()
        assert results["detectors"][regime]["auroc"]["white_box_min_eps"]  # the detector table of seed 0
        assert (out / "detectors" / regime / "roc.png").is_file()
    runs = {r: json.loads((out / "runs" / r / "seed0" / "run.json").read_text())["config"] for r in results["regimes"]}
    assert runs["csg"]["loss"]["csg_weight"] > 0 and runs["consistent"]["loss"]["csg_weight"] == 0
    verdicts = {c["verdict"] for c in results["comparisons"]}
    assert verdicts <= {"better", "worse", "no measurable difference"} and results["comparisons"]
    assert (out / "figures" / "metrics.png").is_file()
    assert results["compute_seconds"] >= sum(results["regimes"]["pgd_at"]["train_seconds"]) > 0
    md = (out / "results.md").read_text()
    assert "| metric | pgd_at | consistent | csg |" in md and "flip rate" in md and "Comparisons" in md
    assert "| label stability † |" in md and "reused" not in md  # a fresh run: its wall time is the figure


def test_experiment_rejects_bad_arguments(tmp_path, capsys):
    assert main(["experiment", "paper", "--out", str(tmp_path), "--lambda", "0"]) == 2
    assert "--lambda" in capsys.readouterr().err
    assert main(["experiment", "paper", "--out", str(tmp_path), "--set", "nonsense"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["experiment", "paper", "--out", str(tmp_path), "--regimes", "magic"]) == 2
    assert "unknown ['magic']" in capsys.readouterr().err
    assert main(["experiment", "paper", "--out", str(tmp_path), "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err


def _row(seed: int, shift: float) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    units = {name: {key: list(np.clip(rng.normal(0.4 + shift, 0.1, n), 0, 1))
                    for key in ("consistency_real", "consistency_all", "consistency_white_box", "consistency_shared",
                                "mis")} for name, n in (("layer2", 64), ("layer3", 128))}
    return {"units": units, "label_stability": [0.9, 0.95], "r_mean": [0.45, 0.42],
            "unique_detectors": {"layer2": 10, "layer3": 20}, "dissect_attack_success": 0.01,
            "clean_correct": list((rng.random(200) < 0.95).astype(float)),
            "robust_correct": list((rng.random(90) < 0.9).astype(float)), "white_box_flip_rate": 0.98,
            "feature_gap": list(rng.gamma(2.0, 0.05 + shift, 90)),
            "white_box_median_eps": 0.08, "white_box_note": "", "shared_pool_flip": 0.2,
            "shared_pool_target_hit": 0.05, "seed": seed, "train_seconds": 1.0}


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_summary_tables_and_figures_from_per_seed_rows(tmp_path):
    """The statistics plumbing without training: a regime whose units are 0.2 more consistent is "better" on
    consistency, identical ones give "no measurable difference", and the markdown and figures are written."""
    from conceptlens.training.experiment import ExperimentConfig, summarize, to_markdown, write_figures

    cfg = ExperimentConfig(out=tmp_path, resamples=200)
    per_seed = {"pgd_at": [_row(s, 0.0) for s in range(3)], "consistent": [_row(10 + s, 0.2) for s in range(3)],
                "csg": [_row(20 + s, 0.0) for s in range(3)], "standard": [_row(30 + s, 0.0) for s in range(3)]}
    results = summarize(per_seed, cfg, {})
    verdicts = {(c["a"], c["b"], c["metric"]): c["verdict"] for c in results["comparisons"]}
    assert verdicts[("consistent", "pgd_at", "consistency_real")] == "better"
    assert verdicts[("csg", "standard", "consistency_real")] == "no measurable difference"
    assert verdicts[("consistent", "pgd_at", "feature_gap")] == "worse"  # a larger gap, and lower is better
    cell = results["regimes"]["consistent"]["consistency_real"]
    assert cell["low"] < 0.6 < cell["high"] and len(results["regimes"]["consistent"]["clean_accuracy_per_seed"]) == 3
    results["settings"] = {"seeds": [0, 1, 2]}
    md = to_markdown(results)
    assert "| metric | pgd_at | consistent | csg | standard |" in md and "flip rate within the cap" in md
    assert "mostly failed attacks" in md  # the dissection PGD succeeded on 1% in every regime here
    # the shared pool flipped 20% of each model's predictions: its row is marked as mostly failed transfers
    assert "| consistency, real ∪ shared transfer pool ‡ |" in md and "consistent 20.0%" in md
    assert "reused" not in md
    # a resumed run's wall time undercounts; the sum of its steps stands in for it
    resumed = to_markdown({**results, "wall_seconds": 600.0, "compute_seconds": 3000.0})
    assert "Wall time 600.0 s (this run reused finished trainings" in resumed and "50 min)" in resumed
    figures = write_figures(results, tmp_path / "figures")
    assert all(p.is_file() and p.stat().st_size > 1000 for p in figures)


def test_an_interrupted_training_is_continued_from_its_checkpoint(tmp_path, caplog):
    """A run the experiment left without run.json (killed mid-training) is resumed, not refused as a clash:
    otherwise a restarted `experiment paper` stops at the first interrupted model (as a sweep of ours did)."""
    import logging

    import torch

    from conceptlens.training import config as train_config
    from conceptlens.training.experiment import QUICK, _train

    tc = train_config.load(None, [*QUICK, "attack.name=none"])
    run_dir = tmp_path / "runs" / "standard" / "seed0"
    finished = _train(tc, run_dir)
    (run_dir / "run.json").unlink()  # as if killed after its last checkpoint
    with caplog.at_level(logging.INFO, logger="conceptlens.training.experiment"):
        continued = _train(tc, run_dir)
    assert "continuing the interrupted run" in caplog.text
    assert (run_dir / "run.json").is_file()
    for a, b in zip(finished.state_dict().values(), continued.state_dict().values(), strict=True):
        assert torch.equal(a, b)
