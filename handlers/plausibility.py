"""Per-class calibration of the trace's plausibility (docs/design.md §5.10).

The raw plausibility (`handlers/trace.py`) is the influence-weighted co-occurrence of the traced units' concepts
with the explained class. How high it runs on clean images depends on the class, not on the input: when the
units that carry a class were labelled by dissection with concepts of other classes (on the default bundle,
clean rockets are carried by units labelled "wall" and "stem"), its clean images score near 0 however clean
they are, and no weighting of the co-occurrence table can lift them. So the served plausibility is the raw one
read against the class's own clean images: the share of held-out clean images explained as that class whose raw
plausibility is at most this one's (a one-sided p-value; ties count as "at most"). "plausibility < α" then flags
at most about a fraction α of each class's clean images, whatever the class. A trace with no qualifying unit (raw
None: nothing vouches for the class) counts as raw 0, the least plausible value, both in the reference and when
served, so a calibrated bundle serves a plausibility whenever it has a co-occurrence table.

The reference is 101 quantiles (0%, 1%, ..., 100%) of the raw plausibility per class, fitted by
`training/calibrate.py` on held-out clean images and stored in the manifest's optional `plausibility_calibration`
entry; a class with fewer than MIN_IMAGES reference images uses the quantiles pooled over all classes. Bundles
without the entry serve the raw plausibility, as before.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BundleError

GRID = 101  # quantiles at 0%, 1%, ..., 100%
MIN_IMAGES = 20  # fewer reference images explained as a class: it uses the pooled quantiles
ENTRY = "plausibility_calibration"


@dataclass(frozen=True)
class PlausibilityCalibration:
    """quantiles (K, GRID): row c holds the sorted GRID-point quantiles of class c's clean raw plausibility."""

    quantiles: np.ndarray

    def __call__(self, raw: float | None, target: int) -> float:
        """The share of the class's clean reference images whose raw plausibility is <= `raw` (None counts as 0)."""
        row = self.quantiles[target]
        return float(np.searchsorted(row, 0.0 if raw is None else raw, side="right")) / len(row)


def fit_reference(raw: np.ndarray, explained: np.ndarray, n_classes: int) -> tuple[np.ndarray, list[int]]:
    """(quantiles (K, GRID), reference images per class) from clean images' raw plausibility (NaN = no unit
    qualified, counted as 0) and the class each was explained as."""
    raw = np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0)
    explained = np.asarray(explained)
    if raw.size == 0:
        raise ValueError("no clean image to calibrate the plausibility against")
    levels = np.linspace(0.0, 1.0, GRID)
    pooled = np.quantile(raw, levels, method="inverted_cdf")
    quantiles = np.tile(pooled, (n_classes, 1))
    counts = []
    for c in range(n_classes):
        values = raw[explained == c]
        counts.append(int(values.size))
        if values.size >= MIN_IMAGES:
            quantiles[c] = np.quantile(values, levels, method="inverted_cdf")
    return quantiles, counts


def to_manifest(quantiles: np.ndarray, counts: Sequence[int], classes: Sequence[str],
                source: str) -> dict[str, Any]:
    """The manifest's `plausibility_calibration` object (JSON-safe)."""
    return {"quantiles": {c: [round(float(v), 6) for v in quantiles[i]] for i, c in enumerate(classes)},
            "images": {c: int(counts[i]) for i, c in enumerate(classes)}, "data": source}


def parse_entry(raw: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Validate the manifest's `plausibility_calibration` object; raises BundleError naming the field."""

    def bad(field: str, problem: str) -> BundleError:
        return BundleError(f"manifest field {ENTRY + field!r}: {problem}")

    if not isinstance(raw, dict):
        raise bad("", "expected an object")
    table = raw.get("quantiles")
    if not isinstance(table, dict) or set(table) != set(classes):
        raise bad(".quantiles", "expected one list per class")
    for name, values in table.items():
        ok = isinstance(values, list) and len(values) == GRID and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or any(b < a for a, b in itertools.pairwise(values)):
            raise bad(f".quantiles.{name}", f"expected {GRID} finite numbers in ascending order")
    return dict(raw)


def load(entry: dict[str, Any], classes: Sequence[str]) -> PlausibilityCalibration:
    return PlausibilityCalibration(np.array([entry["quantiles"][c] for c in classes], dtype=np.float64))


_CALIBRATIONS: weakref.WeakKeyDictionary[Any, PlausibilityCalibration | None] = weakref.WeakKeyDictionary()


def calibration_for(runtime: Any) -> PlausibilityCalibration | None:
    """The runtime's plausibility calibration (None for bundles without one), loaded once per model version."""
    if runtime not in _CALIBRATIONS:
        entry = getattr(runtime.manifest, "plausibility_calibration", None)
        _CALIBRATIONS[runtime] = None if not entry else load(entry, runtime.manifest.classes)
    return _CALIBRATIONS[runtime]
