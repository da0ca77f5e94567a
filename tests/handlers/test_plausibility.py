"""The per-class plausibility calibration on data whose answer is known: two classes whose clean raw plausibility
runs in different ranges (the class dependence the calibration removes) are flagged below a level α at about α
each on held-out data, a trace with no qualifying unit counts as the least plausible, and the manifest entry is
validated naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlens.handlers import plausibility as P
from conceptlens.handlers.errors import BundleError


def _clean(rng, n):
    """Class 0 (like clean rockets) mostly near 0, with ties at exactly 0 and some traces without a qualifying
    unit (NaN); class 1 (like clean flowers) near 1."""
    explained = rng.integers(0, 2, n)
    raw = np.where(explained == 0, rng.beta(1, 6, n), rng.beta(8, 1, n))
    raw[(explained == 0) & (rng.random(n) < 0.3)] = 0.0
    raw[(explained == 0) & (rng.random(n) < 0.1)] = np.nan
    return raw, explained


def test_every_class_is_flagged_below_alpha_at_about_alpha_on_held_out_images():
    rng = np.random.default_rng(0)
    quantiles, counts = P.fit_reference(*_clean(rng, 4000), 2)
    calibration = P.PlausibilityCalibration(quantiles)
    raw, explained = _clean(rng, 40_000)
    served = np.array([calibration(None if np.isnan(r) else r, int(c)) for r, c in zip(raw, explained, strict=True)])
    assert np.all((served >= 0) & (served <= 1)) and sum(counts) == 4000
    for alpha in (0.05, 0.2):
        assert (np.nan_to_num(raw[explained == 0], nan=0) < alpha).mean() > 0.5  # raw: class 0 looks implausible
        for c in (0, 1):
            assert (served[explained == c] < alpha).mean() <= alpha + 0.02
        assert (served[explained == 1] < alpha).mean() == pytest.approx(alpha, abs=0.02)  # continuous: exactly
    # class 0's lowest 37% (the ties at 0 and the traces without a unit) are indistinguishable: none falls below α
    assert calibration(None, 0) == calibration(0.0, 0) and 0.3 < calibration(0.0, 0) < 0.45
    assert calibration(0.0, 1) < 0.02 and calibration(1.0, 1) == 1.0


def test_a_class_without_enough_images_uses_the_pooled_reference():
    raw = np.concatenate([np.linspace(0, 1, 200), np.full(P.MIN_IMAGES - 1, 0.5)])
    explained = np.concatenate([np.zeros(200, dtype=int), np.ones(P.MIN_IMAGES - 1, dtype=int)])
    quantiles, counts = P.fit_reference(raw, explained, 3)
    assert counts == [200, P.MIN_IMAGES - 1, 0]
    assert np.array_equal(quantiles[1], quantiles[2]) and np.array_equal(quantiles[1],
                                                                          np.quantile(raw, np.linspace(0, 1, P.GRID),
                                                                                      method="inverted_cdf"))
    assert np.allclose(quantiles[0], np.linspace(0, 1, P.GRID), atol=0.01)


@pytest.mark.parametrize("entry, field", [
    ([], ""), ({"quantiles": {"car": [0.0] * P.GRID}}, "quantiles"),
    ({"quantiles": {"car": [0.0] * P.GRID, "boat": [0.0] * 5}}, "quantiles.boat"),
    ({"quantiles": {"car": [0.0] * P.GRID, "boat": [1.0] + [0.0] * (P.GRID - 1)}}, "quantiles.boat"),
    ({"quantiles": {"car": [0.0] * P.GRID, "boat": [float("nan")] * P.GRID}}, "quantiles.boat"),
])
def test_a_bad_manifest_entry_is_refused_naming_the_field(entry, field):
    good = P.to_manifest(np.zeros((2, P.GRID)), [10, 10], ["car", "boat"], "shapes:10")
    assert P.parse_entry(good, ["car", "boat"]) == good
    with pytest.raises(BundleError, match=f"'plausibility_calibration{'.' + field if field else ''}'"):
        P.parse_entry(entry, ["car", "boat"])
