"""evaluate(): clean and PGD robust accuracy, overall and per class, reproducible, leaving RNG streams alone."""

from __future__ import annotations

import pytest
import torch

from conceptlens.handlers import zoo
from conceptlens.training.data.registry import open_dataset
from conceptlens.training.evaluate import evaluate


@pytest.fixture(scope="module")
def setup() -> tuple[zoo.ImageClassifier, torch.utils.data.Dataset]:
    data = open_dataset("shapes:40", "val", size=32)
    torch.manual_seed(0)
    model = zoo.build_model("small_cnn", data.classes, input_size=32).eval()
    return model, data


def test_clean_accuracy_overall_and_per_class(setup) -> None:
    model, data = setup
    result = evaluate(model, data, steps=0, batch_size=16)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    assert result["n"] == 40 and result["robust_accuracy"] is None and result["attack"] is None
    assert result["clean_accuracy"] == pytest.approx(correct.float().mean().item())
    for i, name in enumerate(data.classes):
        row = result["per_class"][name]
        assert row["n"] == int((labels == i).sum())
        if row["n"]:
            assert row["clean_accuracy"] == pytest.approx(correct[labels == i].float().mean().item())
    assert sum(r["n"] for r in result["per_class"].values()) == 40


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_robust_accuracy_under_pgd(setup) -> None:
    model, data = setup
    strong = evaluate(model, data, eps=0.5, steps=5, robust_n=24, batch_size=16)
    assert strong["robust_n"] == 24 and strong["attack"]["steps"] == 5
    assert strong["robust_accuracy"] == 0.0  # ε = 0.5 in L∞ fools an untrained network on every image
    tiny = evaluate(model, data, eps=1e-6, steps=2, robust_n=24, batch_size=16)
    clean_prefix = evaluate(model, data, steps=0, n=24)["clean_accuracy"]
    assert tiny["robust_accuracy"] == pytest.approx(clean_prefix)  # a negligible budget changes nothing


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_reproducible_and_leaves_global_rng_alone(setup) -> None:
    model, data = setup
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = evaluate(model, data, eps=4 / 255, steps=2, robust_n=16, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = evaluate(model, data, eps=4 / 255, steps=2, robust_n=16, seed=7, batch_size=5)
    assert a["robust_accuracy"] == b["robust_accuracy"] and a["clean_accuracy"] == b["clean_accuracy"]
    assert model.training is False
