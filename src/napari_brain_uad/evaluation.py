"""Evaluation: how well a model's anomaly maps find the lesions an expert drew.

One owner for the protocol every door reports — ``brain-uad evaluate``, the Evaluate widget,
calibration (``brain-uad-calibrate``) and ``benchmarks/bench_detection.py``:

- a case is a scan with its lesion mask (and optionally its brain mask), both on the scan's
  grid (:class:`LabelledCase`, :func:`read_case`);
- it goes through ``analysis.analyse_scan`` with the run's settings (:func:`analyse_cases`: the
  one loop over cases, also used for healthy scans without a lesion mask);
- it is scored on the filtered map (5³ median, eroded brain) inside the eroded brain
  (:func:`evaluate_filtered`, :func:`evaluate_analysis`): [Dice] (the best Dice over all
  thresholds), AUPRC, the l1 error inside and outside the lesions and their ratio, and, at a
  threshold, the Dice, precision and recall of exactly the mask the user would export
  (``mask_at``: the threshold, then small components removed);
- many cases give a table, its mean (NaN values skipped) and the pooled [Dice] and AUPRC over
  all voxels of all cases (:class:`CohortEvaluation`).

No Qt, napari or torch import here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .analysis import AnalysisSettings, ScanAnalysis, analyse_scan
from .metrics import auprc, auprc_pooled, best_dice, best_dice_pooled, dice, l1_inside_outside, precision_recall_curve
from .models import ReconstructionModel
from .nifti import NiftiVolume, ScanError, scan_stem
from .postprocess import FilteredMap
from .scan_reader import read_scan
from .thresholds import ChosenThreshold

# A lesion mask overlays its scan when their affines agree to this (mm).
GRID_TOLERANCE_MM = 1e-3

NOTE = "metrics on each scan's own grid, inside the eroded brain mask, after the 5x5x5 median"


@dataclass(frozen=True)
class LabelledCase:
    """A scan, its lesion mask (None for a healthy scan) and its brain mask (None: the scan is
    skull-stripped), as file paths."""

    image: str | os.PathLike
    truth: str | os.PathLike | None = None
    brain_mask: str | os.PathLike | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or scan_stem(self.image)


def read_case(case: LabelledCase) -> tuple[NiftiVolume, np.ndarray | None, NiftiVolume | None]:
    """The scan, its lesion mask as booleans on the scan's grid (or None), and its brain mask."""
    scan = read_scan(case.image)
    truth = None
    if case.truth is not None:
        mask = read_scan(case.truth, allow_empty=True)
        check_same_grid(mask, scan, "lesion mask")
        truth = mask.data > 0
    brain = read_scan(case.brain_mask, allow_empty=True) if case.brain_mask is not None else None
    return scan, truth, brain


def check_same_grid(mask: NiftiVolume, scan: NiftiVolume, what: str) -> None:
    """Refuse a mask that is not on the scan's voxel grid (shape and affine)."""
    if mask.data.shape != scan.data.shape or not np.allclose(mask.geometry.affine, scan.geometry.affine,
                                                             atol=GRID_TOLERANCE_MM):
        raise ScanError(f"{mask.path}: the {what} is not on the grid of {scan.path} (shape or affine differs)")


def analyse_cases(
    cases: Sequence[LabelledCase],
    model: ReconstructionModel,
    settings: AnalysisSettings,
    *,
    announce: Callable[[int, int, LabelledCase], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[tuple[LabelledCase, ScanAnalysis, np.ndarray | None]]:
    """Each case read and analysed in turn: (case, analysis, lesion mask or None).

    ``announce(index, count, case)`` before each case; ``progress`` and ``cancelled`` go to
    ``analyse_scan`` for each."""
    for index, case in enumerate(cases):
        if announce is not None:
            announce(index, len(cases), case)
        scan, truth, brain = read_case(case)
        analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings, progress=progress,
                                cancelled=cancelled)
        yield case, analysis, truth


@dataclass(eq=False)
class CaseEvaluation:
    """One case's numbers, and the voxels they were computed on (for pooling and the curve)."""

    name: str
    lesion_voxels: int
    best_dice: float
    auprc: float
    prevalence: float  # share of the evaluated region that is lesion: AUPRC's chance level
    dice: float | None = None  # at the threshold; None without one
    precision: float | None = None
    recall: float | None = None
    l1_inside: float | None = None
    l1_outside: float | None = None
    l1_ratio: float | None = None
    values: np.ndarray = field(default=None, repr=False)
    truth: np.ndarray = field(default=None, repr=False)  # lesion voxels inside the region
    region: np.ndarray = field(default=None, repr=False)

    def row(self) -> dict:
        """The table row: name, lesion voxels and every metric that was computed."""
        row = {"case": self.name, "lesion_voxels": self.lesion_voxels, "best_dice": self.best_dice,
               "auprc": self.auprc}
        for key in ("dice", "precision", "recall", "l1_inside", "l1_outside", "l1_ratio"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        return row

    def curve(self) -> dict[str, np.ndarray]:
        """The precision-recall curve whose area is :attr:`auprc`."""
        return precision_recall_curve(self.values, self.truth, self.region)


def evaluate_filtered(
    filtered: FilteredMap,
    truth: np.ndarray,
    *,
    threshold: float | None = None,
    min_size_ml: float | None = None,
    name: str = "",
    image: np.ndarray | None = None,
    reconstruction: np.ndarray | None = None,
) -> CaseEvaluation:
    """A filtered map against a lesion mask on the same grid, inside the map's eroded region.

    At ``threshold`` the prediction is ``filtered.mask_at(threshold, min_size_ml)``, the mask
    the user gets. ``image`` and ``reconstruction`` (same grid) add the l1 columns."""
    result = _ranking(filtered.values, truth, filtered.region, name)
    lesion, region = result.truth, result.region
    if threshold is not None:
        predicted = filtered.mask_at(float(threshold), min_size_ml=min_size_ml)
        _add_operating_point(result, predicted, lesion)
    if image is not None and reconstruction is not None:
        l1 = l1_inside_outside(image, reconstruction, lesion, region)
        result.l1_inside, result.l1_outside, result.l1_ratio = l1["l1_inside"], l1["l1_outside"], l1["l1_ratio"]
    return result


def evaluate_analysis(
    analysis: ScanAnalysis,
    truth: np.ndarray,
    *,
    threshold: float | None = None,
    min_size_ml: float | None = None,
    name: str | None = None,
) -> CaseEvaluation:
    """A scan's analysis against its lesion mask (on the scan's grid), with the l1 columns in
    the scan's intensities; the minimum lesion size defaults to the analysis's own."""
    return evaluate_filtered(
        analysis.filtered, truth, threshold=threshold,
        min_size_ml=analysis.default_min_size_ml if min_size_ml is None else min_size_ml,
        name=name if name is not None else scan_stem(analysis.scan.path),
        image=analysis.scan.data, reconstruction=analysis.reconstruction,
    )


def evaluate_map(values: np.ndarray, truth: np.ndarray, *, threshold: float | None = None, name: str = "") -> CaseEvaluation:
    """A map that did not come from an analysis (read from a file): its non-zero voxels are the
    region it covers, and a threshold is applied as it is (no components removed)."""
    values = np.asarray(values, dtype=np.float32)
    region = values != 0
    if not region.any():
        raise ScanError(f"{name or 'the map'}: every voxel is zero; there is nothing to evaluate")
    result = _ranking(values, truth, region, name)
    if threshold is not None:
        _add_operating_point(result, (values > threshold) & region, result.truth)
    return result


def _ranking(values: np.ndarray, truth: np.ndarray, region: np.ndarray, name: str) -> CaseEvaluation:
    """The threshold-free numbers of a map inside ``region``: [Dice], AUPRC and its chance level."""
    truth = np.asarray(truth, dtype=bool)
    if truth.shape != region.shape:
        raise ScanError(f"the lesion mask's shape {truth.shape} is not the map's {region.shape}")
    lesion = truth & region
    return CaseEvaluation(
        name=name,
        lesion_voxels=int(np.count_nonzero(lesion)),
        best_dice=best_dice(values, lesion, region),
        auprc=auprc(values, lesion, region),
        prevalence=float(np.count_nonzero(lesion) / np.count_nonzero(region)),
        values=values, truth=lesion, region=region,
    )


def _add_operating_point(result: CaseEvaluation, predicted: np.ndarray, lesion: np.ndarray) -> None:
    predicted = np.asarray(predicted, dtype=bool)
    hits = np.count_nonzero(predicted & lesion)
    result.dice = dice(predicted, lesion)
    result.precision = float(hits / max(np.count_nonzero(predicted), 1))
    result.recall = float(hits / np.count_nonzero(lesion)) if lesion.any() else float("nan")


def flagged_fraction(filtered: FilteredMap, threshold: float) -> float:
    """Share of the evaluated (eroded) brain whose filtered score is above ``threshold``: on a
    healthy scan, the false alarms."""
    return float(np.count_nonzero(filtered.values[filtered.region] > threshold) / np.count_nonzero(filtered.region))


def mean_row(rows: Sequence[dict]) -> dict:
    """The mean of each numeric column over ``rows``, NaN values skipped (AUPRC of a healthy
    case is undefined)."""
    mean: dict = {"case": "mean", "cases": len(rows)}
    if not rows:
        return mean
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if key == "case" or not all(isinstance(value, (int, float, np.number)) for value in values):
            continue
        finite = [float(value) for value in values if not math.isnan(float(value))]
        mean[key] = float(np.mean(finite)) if finite else float("nan")
    return mean


def pooled(cases: Sequence[CaseEvaluation]) -> dict[str, float]:
    """[Dice] and AUPRC over the voxels of all cases together (one ranking)."""
    maps = [case.values for case in cases]
    truths = [case.truth for case in cases]
    regions = [case.region for case in cases]
    return {"best_dice": float(best_dice_pooled(maps, truths, regions)),
            "auprc": float(auprc_pooled(maps, truths, regions))}


@dataclass(eq=False)
class CohortEvaluation:
    """Many cases evaluated with one model, scorer and threshold."""

    cases: list[CaseEvaluation]
    settings: AnalysisSettings
    threshold: ChosenThreshold | None = None

    @property
    def rows(self) -> list[dict]:
        return [case.row() for case in self.cases]

    @property
    def mean(self) -> dict:
        return mean_row(self.rows)

    @property
    def pooled(self) -> dict[str, float]:
        return pooled(self.cases)

    def document(self, **about) -> dict:
        """A JSON-ready record: ``about`` (the model, say), the settings, the threshold, every
        case, the mean and the pooled numbers."""
        return {
            **about,
            "scorer": self.settings.scorer,
            "samples": self.settings.samples,
            "noise_levels": list(self.settings.noise_levels) if self.settings.noise_levels else None,
            "median": self.settings.median,
            "threshold": {"name": self.threshold.name if self.threshold else None,
                          "value": self.threshold.value if self.threshold else None},
            "cases": self.rows,
            "mean": self.mean,
            "pooled": self.pooled,
            "note": NOTE,
        }


def evaluate_cases(
    cases: Sequence[LabelledCase],
    model: ReconstructionModel,
    settings: AnalysisSettings,
    *,
    threshold: ChosenThreshold | None = None,
    min_size_ml: float | None = None,
    announce: Callable[[int, int, LabelledCase], None] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> CohortEvaluation:
    """Analyse and evaluate every case (each must have a lesion mask) with one model."""
    for case in cases:
        if case.truth is None:
            raise ScanError(f"{case.image}: a lesion mask is needed to evaluate it")
    results = [
        evaluate_analysis(analysis, truth, threshold=threshold.value if threshold else None,
                          min_size_ml=min_size_ml, name=case.label)
        for case, analysis, truth in analyse_cases(cases, model, settings, announce=announce, progress=progress,
                                                   cancelled=cancelled)
    ]
    return CohortEvaluation(results, settings, threshold)
