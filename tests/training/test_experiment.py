"""`conceptlens experiment paper --quick` trains the three regimes, dissects them and writes both result files."""

from __future__ import annotations

import json

import pytest

from conceptlens.cli import main


@pytest.mark.slow
def test_experiment_paper_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "paper", "--out", str(out), "--quick", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert printed == results
    assert list(results["regimes"]) == ["standard", "pgd_at", "consistent"]
    for regime, row in results["regimes"].items():
        assert 0 <= row["clean_accuracy"] <= 1, regime
        assert 0 <= row["robust_accuracy"] <= 1, regime
        assert set(row["unique_detectors"]) == {"layer2", "layer3"}
        assert 0 < row["consistency_real"] <= 1 and 0 < row["consistency_all"] <= 1
        assert 0 <= row["r_mean"] <= 1 and row["mis"] >= 0
        assert (out / "dissect" / regime / "report.html").is_file()
        assert json.loads((out / "runs" / regime / "run.json").read_text())["regime"] == {
            "standard": "standard", "pgd_at": "adversarial", "consistent": "consistent"}[regime]
    md = (out / "results.md").read_text()
    assert "| metric | standard | pgd_at | consistent |" in md and "Consistent loss vs PGD-AT" in md


def test_experiment_rejects_bad_arguments(tmp_path, capsys):
    assert main(["experiment", "paper", "--out", str(tmp_path), "--lambda", "0"]) == 2
    assert "--lambda" in capsys.readouterr().err
    assert main(["experiment", "paper", "--out", str(tmp_path), "--set", "nonsense"]) == 2
    assert "section.key=value" in capsys.readouterr().err
