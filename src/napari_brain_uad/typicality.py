"""How typical a scan is for a model: the warning a user needs before trusting its findings.

A model trained on one scanner's healthy scans reconstructs another scanner's or protocol's
scans less well *everywhere*, not only at lesions, and then flags healthy brain. That shows in
the scan's typical score: the **median reconstruction error |x − x̂| inside the model-space
brain** (records calibrated before it hold the median of the filtered anomaly map, and are read
with it; see :data:`STATISTIC`). Focal lesions hardly move a median (they are a few percent of
the brain at most), so it measures how well the model knows the scan as a whole, whichever
scorer draws the map.

At calibration the typical score of every healthy calibration scan is stored with the model,
with the scorer and settings it holds for (``metadata["typicality"]``). A new scan's
**typicality score** is a robust z-score against them: how many healthy spreads (1.4826 × the
median absolute deviation, the standard deviation of a normal distribution) its score lies above the healthy
scans' median. 0 is as typical as the calibration scans; below 0 the model reconstructs it
better than them; above the stored limit (3 by default) the scan is called atypical and every
door warns. Measured with the default model's reconstruction error: its 15 healthy IXI
validation scans −1.3 to 4.7 (median errors 0.035–0.048 of the [0, 1] range).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .thresholds import CALIBRATED_SETTINGS

# The scan's typical score, by the name a calibration record stores it under. The first was the
# median of the filtered anomaly map; but a map that counts one direction only (residual-dark,
# residual-bright) is 0 on more than half of a healthy brain, so that median is 0 for every scan
# and tells nothing. New calibrations store the median reconstruction error |x − x̂| inside the
# model-space brain: what the model knows of the scan as a whole, whichever scorer draws the map.
MEDIAN_FILTERED = "median filtered score in the brain"
RECONSTRUCTION_ERROR = "median |x - reconstruction| in the model-space brain"
STATISTIC = RECONSTRUCTION_ERROR
TYPICALITY_LIMIT = 3.0
# Normal-distribution standard deviations per median absolute deviation.
_MAD_TO_SD = 1.4826
# The spread is never taken below this share of the healthy median: with a handful of
# calibration scans of one scanner the MAD can be near zero, which would call every scan atypical.
_SMALLEST_RELATIVE_SPREAD = 0.03
CALIBRATE_HINT = "calibrate the model on a few healthy scans of your scanner (brain-uad calibrate)"


def scan_statistic(analysis, statistic: str = STATISTIC) -> float:
    """A scan's typical score (``analysis.ScanAnalysis``), by ``statistic``'s rule."""
    if statistic == MEDIAN_FILTERED:
        filtered = analysis.filtered
        return float(np.median(filtered.values[filtered.region]))
    if statistic == RECONSTRUCTION_ERROR:
        volume = analysis.model_space
        error = np.abs(volume.image - np.asarray(analysis.reconstruction_model_space, dtype=np.float32))
        return float(np.median(error[volume.brain_mask]))
    raise ValueError(f"unknown typicality statistic {statistic!r}")


def healthy_record(analyses: Sequence, settings, subjects: Sequence[str], *,
                   limit: float = TYPICALITY_LIMIT) -> dict[str, Any]:
    """What is stored with a model: the healthy scans' statistics and how to read a new one."""
    values = np.array([scan_statistic(analysis) for analysis in analyses], dtype=np.float64)
    centre = float(np.median(values))
    spread = max(_MAD_TO_SD * float(np.median(np.abs(values - centre))), _SMALLEST_RELATIVE_SPREAD * abs(centre))
    return {
        "statistic": STATISTIC,
        "scorer": settings.scorer,
        "samples": int(settings.samples),
        "noise_levels": list(settings.noise_levels) if settings.noise_levels else None,
        "median": bool(settings.median),
        "healthy_median": centre,
        "healthy_spread": spread,
        "limit": float(limit),
        "healthy_values": [float(v) for v in values],
        "subjects": list(subjects),
    }


@dataclass(frozen=True)
class Typicality:
    """A scan's typicality for a model."""

    score: float  # robust z-score against the healthy calibration scans
    limit: float
    statistic: float  # the scan's typical score, by the record's statistic

    @property
    def atypical(self) -> bool:
        return self.score > self.limit

    def describe(self) -> str:
        """One line for a status bar or a terminal."""
        if self.atypical:
            return (f"⚠ typicality {self.score:.1f} (limit {self.limit:g}): this scan differs from the model's "
                    f"training scans (scanner or protocol?); findings are unreliable; {CALIBRATE_HINT}")
        return f"typicality {self.score:.1f} (typical below {self.limit:g})"


def assess(analysis, metadata: Mapping[str, Any]) -> Typicality | None:
    """The typicality of an analysed scan (``analysis.ScanAnalysis``) for the model whose card is
    ``metadata``; None when the model stores none for these settings. The reconstruction error
    holds for any scorer made from the same reconstructions (N, noise levels); a record of the
    older filtered-map median only for the scorer, N, noise levels and median filter it was
    calibrated with."""
    record = metadata.get("typicality")
    if not isinstance(record, Mapping):
        return None
    settings = analysis.settings
    statistic_name = record.get("statistic", MEDIAN_FILTERED)
    now = {"samples": int(settings.samples),
           "noise_levels": list(settings.noise_levels) if settings.noise_levels else None,
           "median": bool(settings.median)}
    bound_to = ("samples", "noise_levels") if statistic_name == RECONSTRUCTION_ERROR else CALIBRATED_SETTINGS
    if statistic_name != RECONSTRUCTION_ERROR and record.get("scorer") != settings.scorer:
        return None
    if any(record.get(key) != now[key] for key in bound_to):
        return None
    statistic = scan_statistic(analysis, statistic_name)
    score = (statistic - float(record["healthy_median"])) / float(record["healthy_spread"])
    return Typicality(score=score, limit=float(record.get("limit", TYPICALITY_LIMIT)), statistic=statistic)
