"""The consistency and specificity metrics on cases whose answer is known in closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conceptlens.handlers.errors import InvalidInput
from conceptlens.training.dissect.labels import Concept, label_units, unique_detectors
from conceptlens.training.dissect.metrics import (
    TopKPool,
    class_specificity,
    label_stability,
    load_affinity,
    representation_ratio,
    unit_consistency,
)


def test_unit_consistency_is_p_transpose_a_p():
    classes = torch.tensor([[2, 2, 2, 2], [0, 1, 2, 3], [0, 0, 1, 1]])
    assert unit_consistency(classes, 4).tolist() == pytest.approx([1.0, 0.25, 0.5])
    ones = torch.ones(4, 4)
    assert unit_consistency(classes, 4, ones).tolist() == pytest.approx([1.0, 1.0, 1.0])
    a = torch.eye(4)
    a[0, 1] = a[1, 0] = 0.5  # classes 0 and 1 are similar: unit 2 becomes more consistent
    assert unit_consistency(classes, 4, a)[2].item() == pytest.approx(0.5 + 2 * 0.25 * 0.5)


def test_load_affinity_reorders_rows_and_validates(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"classes": ["b", "a"], "matrix": [[1, 0.3], [0.3, 1]]}))
    assert load_affinity(path, ["a", "b"]).tolist() == [[1, 0.3], [0.3, 1]]
    path.write_text(json.dumps({"matrix": [[1, 0.3], [0.1, 1]]}))
    with pytest.raises(InvalidInput, match="symmetric"):
        load_affinity(path, ["a", "b"])
    path.write_text(json.dumps({"matrix": [[1]]}))
    with pytest.raises(InvalidInput, match="2×2"):
        load_affinity(path, ["a", "b"])


def test_topk_pool_keeps_the_best_images_across_batches_and_merges():
    pool = TopKPool(units=2, k=2)
    pool.update(torch.tensor([[1.0, 5.0], [3.0, 0.0]]), torch.tensor([0, 1]), torch.tensor([7, 8]))
    pool.update(torch.tensor([[2.0, 4.0], [0.5, 6.0]]), torch.tensor([2, 3]), torch.tensor([9, 9]))
    assert pool.ids.tolist() == [[1, 2], [3, 0]] and pool.classes.tolist() == [[8, 9], [9, 7]]
    other = TopKPool(units=2, k=2)
    other.update(torch.tensor([[10.0, 0.0]]), torch.tensor([100]), torch.tensor([1]))
    merged = TopKPool.merged(pool, other)
    assert merged.ids.tolist() == [[100, 1], [3, 0]]


def test_class_specificity_is_the_mutual_information_in_nats():
    # Unit 0: bin 1 iff class 0 (of 2 balanced classes) -> I = ln 2. Unit 1: bins independent of class -> 0.
    hist = torch.zeros(2, 2, 2)
    hist[0, 1, 0] = hist[0, 0, 1] = 50
    hist[1] = 25
    mis, per_unit = class_specificity(hist)
    assert per_unit.tolist() == pytest.approx([math.log(2), 0.0], abs=1e-9)
    assert mis == pytest.approx(math.log(2) / 2)


def test_representation_ratio_says_which_class_the_representation_follows():
    mu_s, mu_t = torch.zeros(3, 4), torch.ones(3, 4)
    phi = torch.stack([torch.zeros(4), torch.ones(4), torch.full((4,), 0.5)])
    assert representation_ratio(phi, mu_s, mu_t).tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_labels_detectors_and_label_stability():
    concepts = [Concept(1, "red", "color"), Concept(2, "wheel", "part"), Concept(3, "blue", "color")]
    iou = torch.tensor([[0, 0.10, 0.02, 0.0], [0, 0.01, 0.03, 0.02], [0, 0.0, 0.05, 0.06]])
    units = label_units(iou, concepts)
    assert [(u.label, u.detector) for u in units] == [("red", True), ("wheel", False), ("blue", True)]
    assert units[2].by_category == {"color": {"label": "blue", "iou": pytest.approx(0.06)},
                                    "part": {"label": "wheel", "iou": pytest.approx(0.05)}}
    assert unique_detectors(units) == {"color": 2, "all": 2}
    adv = torch.tensor([[0, 0.08, 0.0, 0.0], [0, 0, 0, 0], [0, 0.0, 0.07, 0.01]])  # unit 2 now says wheel
    stab = label_stability(units, adv)
    assert stab["detectors"] == 2 and stab["stable_fraction"] == 0.5
    assert stab["mean_iou_drop"] == pytest.approx(((0.10 - 0.08) + (0.06 - 0.01)) / 2)
