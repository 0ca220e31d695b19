"""Thresholds: chosen on validation data, stored with the model, picked by name in every door.

A threshold turns the filtered anomaly map into a mask: a voxel is anomalous when its score is
strictly above it (``postprocess``). Its value only means something for the scorer, number of
reconstructions, noise levels and median filter it was found with, so it travels with the
model, in the checkpoint's metadata, together with those settings. This module is the one owner
of that rule:

- the stored format (:func:`stored_entry`) and its reading (:class:`StoredThreshold`);
- choosing a threshold on validation data: without labels, a percentile of the scores on
  healthy scans (:func:`healthy_percentile_threshold`, stored as ``healthy-<P>``); with
  labelled cases, the greedy Dice search of the thesis (:func:`greedy_dice_threshold`, stored
  as ``<cases>-dice``);
- which stored thresholds apply to a scorer (:func:`stored_thresholds`), the model's default one
  (:func:`default_threshold`: its healthy percentile, a false-positive budget) and what a user's
  ``--threshold`` or preset means (:func:`resolve_threshold`).

Stored format, ``metadata["thresholds"][name]``::

    {"value": 0.106, "scorer": "residual", "samples": 1, "noise_levels": null, "median": true,
     "seed": 0, "method": "healthy-percentile", ...how it was found}

An entry that is a bare number, or names no scorer (older cards), is taken to be for the
model's ``default_scorer``; for a model without one it applies to any scorer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SettingsError
from .metrics import _as_numpy, _dice_of_masks
from .postprocess import FilteredMap, _check_map, _check_mask, _check_threshold, remove_small_components

HEALTHY_PERCENTILE = 99.0  # about 1 % of healthy brain voxels above the default threshold
HEALTHY_METHOD = "healthy-percentile"
DICE_METHOD = "greedy-dice"


def healthy_threshold_name(percentile: float = HEALTHY_PERCENTILE, scorer: str | None = None) -> str:
    """``healthy-99``; for a scorer calibrated beside the model's default one, ``healthy-99-<scorer>``
    (names are unique in a card, and each says which scorer it is for)."""
    return f"healthy-{float(percentile):g}" + (f"-{scorer}" if scorer else "")


def dice_threshold_name(lesion_set: str, scorer: str | None = None) -> str:
    return f"{lesion_set}-dice" + (f"-{scorer}" if scorer else "")


def stored_entry(value: float, settings, record: Mapping[str, Any]) -> dict[str, Any]:
    """A threshold as it is stored with a model: its value, the analysis settings it holds for
    (an ``analysis.AnalysisSettings``), and the record of how it was found."""
    return {
        "value": float(value),
        "scorer": settings.scorer,
        "samples": int(settings.samples),
        "noise_levels": list(settings.noise_levels) if settings.noise_levels else None,
        "median": bool(settings.median),
        "seed": settings.seed,
        **record,
    }


# The settings besides the scorer that a stored threshold's value depends on.
CALIBRATED_SETTINGS = ("samples", "noise_levels", "median")


@dataclass(frozen=True)
class StoredThreshold:
    """One threshold stored with a model, read back."""

    name: str
    value: float
    scorer: str | None  # None: the model names no scorer for it, so it applies to any
    method: str | None = None
    # Of CALIBRATED_SETTINGS, those stored with it (noise levels None: the model's own t_test).
    calibrated_with: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_entry(cls, name: str, entry: Any, default_scorer: str | None) -> "StoredThreshold":
        if not isinstance(entry, Mapping):
            entry = {"value": entry}
        try:
            value = float(entry["value"])
        except (KeyError, TypeError, ValueError):
            raise SettingsError(f"threshold {name!r} stored with the model has no numeric value") from None
        calibrated = tuple((key, _comparable(key, entry[key])) for key in CALIBRATED_SETTINGS if key in entry)
        return cls(name=name, value=value, scorer=entry.get("scorer") or default_scorer,
                   method=entry.get("method"), calibrated_with=calibrated)

    def applies_to(self, scorer: str) -> bool:
        return self.scorer is None or self.scorer == scorer

    @property
    def is_healthy_percentile(self) -> bool:
        """A false-positive budget on healthy scans (the safe default), not a Dice-tuned value."""
        return self.method == HEALTHY_METHOD or (self.method is None and self.name.startswith("healthy-"))

    def differences(self, settings) -> list[str]:
        """How ``settings`` differ from those the threshold was calibrated with (besides the
        scorer), one sentence each: its value may not mean the same there."""
        return [f"threshold {self.name!r} was calibrated with {key} = {_shown(stored)}, "
                f"this run uses {_shown(_comparable(key, getattr(settings, key)))}"
                for key, stored in self.calibrated_with if stored != _comparable(key, getattr(settings, key))]


def _comparable(key: str, value: Any) -> Any:
    if key == "noise_levels":
        return tuple(int(level) for level in value) if value else None
    if key == "samples":
        return int(value)
    return bool(value)


def _shown(value) -> str:
    if value is None:
        return "the model's t_test"
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value)


def all_thresholds(metadata: Mapping[str, Any]) -> list[StoredThreshold]:
    """Every threshold stored with a model, in stored order."""
    default_scorer = metadata.get("default_scorer")
    return [StoredThreshold.from_entry(name, entry, default_scorer)
            for name, entry in (metadata.get("thresholds") or {}).items()]


def stored_thresholds(metadata: Mapping[str, Any], scorer: str) -> dict[str, StoredThreshold]:
    """The thresholds stored with a model that apply to ``scorer`` (name -> threshold); the
    widget lists these as presets and the CLI accepts exactly these names."""
    return {threshold.name: threshold for threshold in all_thresholds(metadata) if threshold.applies_to(scorer)}


def default_threshold(metadata: Mapping[str, Any], scorer: str) -> StoredThreshold | None:
    """The model's healthy-percentile threshold for ``scorer`` (a false-positive budget), if any."""
    for threshold in stored_thresholds(metadata, scorer).values():
        if threshold.is_healthy_percentile:
            return threshold
    return None


@dataclass(frozen=True)
class ChosenThreshold:
    """The threshold a run uses: its value, and its stored name (None for a number typed in)."""

    value: float
    name: str | None = None

    def describe(self) -> str:
        return f"{self.name} = {self.value:.6g}" if self.name else f"{self.value:.6g}"


def resolve_threshold(choice: str | float | None, metadata: Mapping[str, Any], settings) -> ChosenThreshold | None:
    """What a user's threshold means for a run with ``settings``: a number, the name of a
    threshold stored with the model, or (None) the model's default for the scorer — None when
    it has none. A stored threshold found with other settings than the run's is still used,
    with a warning per difference; one for another scorer is refused."""
    if choice is None or (isinstance(choice, str) and not choice.strip()):
        default = default_threshold(metadata, settings.scorer)
        if default is None:
            return None
        choice = default.name
    if not isinstance(choice, str):
        return ChosenThreshold(float(choice))
    try:
        return ChosenThreshold(float(choice))
    except ValueError:
        pass
    every = {threshold.name: threshold for threshold in all_thresholds(metadata)}
    if choice not in every:
        usable = ", ".join(stored_thresholds(metadata, settings.scorer)) or "none"
        raise SettingsError(f"threshold {choice!r} is neither a number nor a threshold stored with the model "
                            f"for scorer {settings.scorer} (stored for it: {usable})")
    stored = every[choice]
    if not stored.applies_to(settings.scorer):
        raise SettingsError(f"threshold {choice!r} was calibrated for scorer {stored.scorer}, not "
                            f"{settings.scorer}; use that scorer or give a number")
    for difference in stored.differences(settings):
        warnings.warn(difference, stacklevel=2)
    return ChosenThreshold(stored.value, stored.name)


# ----------------------------------------------------------------------------------------------
# choosing a threshold on validation data



def _validation_cases(maps, brain_masks, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scores, region) per case: FilteredMaps bring their own region; plain arrays need masks."""
    if isinstance(maps, FilteredMap) or (hasattr(maps, "ndim") and maps.ndim == 3):
        maps = [maps]
    maps = list(maps)
    if not maps:
        raise ValueError(f"no {what} maps given")
    if brain_masks is None:
        masks = [None] * len(maps)
    else:
        if hasattr(brain_masks, "ndim") and brain_masks.ndim == 3:
            brain_masks = [brain_masks]
        masks = list(brain_masks)
        if len(masks) != len(maps):
            raise ValueError(f"{len(maps)} {what} maps but {len(masks)} brain masks")
    cases = []
    for index, (score_map, mask) in enumerate(zip(maps, masks)):
        name = f"{what} map {index}"
        if isinstance(score_map, FilteredMap):
            values = score_map.values
            region = score_map.region
            if mask is not None:
                region = region & _check_mask(mask, values.shape, f"brain mask {index}")
        else:
            values = _check_map(score_map, name)
            region = (
                np.ones(values.shape, dtype=bool)
                if mask is None
                else _check_mask(mask, values.shape, f"brain mask {index}")
            )
        cases.append((values, region))
    return cases


def greedy_dice_threshold(
    maps,
    labels,
    brain_masks=None,
    *,
    grid_points: int = 21,
    steps: int = 10,
    min_size_voxels: float = 0,
    objective: str = "mean",
) -> tuple[float, dict]:
    """The threshold maximising Dice on labelled validation cases, found greedily.

    ``maps`` are the maps as they will be thresholded (:class:`FilteredMap` objects, whose eroded
    region is used, or arrays, restricted to ``brain_masks`` when given); ``labels`` the
    ground-truth masks. Dice is computed inside the region; ``objective="mean"`` averages the
    per-case Dice, ``"pooled"`` computes one Dice over all voxels of all cases (as the
    reference code does). ``min_size_voxels`` > 0 removes small components before scoring.

    Search: Dice at ``grid_points`` thresholds spread evenly over the score range, then, in the
    interval around the best of them, ``steps`` rounds of the reference's bisection (compare Dice
    at the first and third quarter points and keep the half with the better one). The best
    threshold seen anywhere is returned with a JSON-serialisable record of the search.
    """
    if objective not in ("mean", "pooled"):
        raise ValueError(f"objective must be 'mean' or 'pooled', got {objective!r}")
    if grid_points < 2 or steps < 0:
        raise ValueError(f"need grid_points >= 2 and steps >= 0, got {grid_points} and {steps}")
    cases = _validation_cases(maps, brain_masks, "validation")
    if hasattr(labels, "ndim") and labels.ndim == 3:
        labels = [labels]
    labels = list(labels)
    if len(labels) != len(cases):
        raise ValueError(f"{len(cases)} validation maps but {len(labels)} label masks")
    prepared = []
    for index, ((values, region), label) in enumerate(zip(cases, labels)):
        truth = _as_numpy(label)
        if truth.shape != values.shape:
            raise ValueError(f"label mask {index} has shape {truth.shape} but its map has shape {values.shape}")
        truth = (truth != 0) & region
        # Voxels outside the region can never be predicted: -inf keeps them below any threshold.
        scores = np.where(region, values, -np.inf)
        prepared.append((scores, truth))

    def evaluate(threshold: float) -> float:
        threshold = _check_threshold(threshold)
        dices, overlap, total = [], 0, 0
        for scores, truth in prepared:
            predicted = scores > threshold
            if min_size_voxels > 0:
                predicted = remove_small_components(predicted, min_size_voxels)
            if objective == "mean":
                dices.append(_dice_of_masks(predicted, truth))
            else:
                overlap += np.count_nonzero(predicted & truth)
                total += np.count_nonzero(predicted) + np.count_nonzero(truth)
        if objective == "mean":
            return float(np.mean(dices))
        return 1.0 if total == 0 else 2.0 * overlap / total

    low = min(float(scores[np.isfinite(scores)].min()) for scores, _ in prepared)
    high = max(float(scores[np.isfinite(scores)].max()) for scores, _ in prepared)
    seen: dict[float, float] = {}

    def score(threshold: float) -> float:
        if threshold not in seen:
            seen[threshold] = evaluate(threshold)
        return seen[threshold]

    grid = np.linspace(low, high, grid_points)
    grid_dice = [score(float(t)) for t in grid]
    best = int(np.argmax(grid_dice))
    bottom, top = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, grid_points - 1)])
    for _ in range(steps):
        quarter, three_quarters = bottom + 0.25 * (top - bottom), bottom + 0.75 * (top - bottom)
        centre = 0.5 * (bottom + top)
        if score(quarter) >= score(three_quarters):
            top = centre
        else:
            bottom = centre
    # Ties: the lowest threshold among equally good ones (the search's first-found order would
    # depend on the grid otherwise).
    best_dice = max(seen.values())
    threshold = min(t for t, d in seen.items() if d == best_dice)
    record = {
        "method": "greedy-dice",
        "threshold": threshold,
        "dice": best_dice,
        "objective": objective,
        "score_range": [low, high],
        "grid_points": int(grid_points),
        "steps": int(steps),
        "evaluations": len(seen),
        "min_size_voxels": float(min_size_voxels),
        "cases": len(prepared),
        "rule": "score > threshold",
    }
    return threshold, record


def healthy_percentile_threshold(maps, brain_masks=None, *, percentile: float = HEALTHY_PERCENTILE) -> tuple[float, dict]:
    """A threshold with a false-positive budget: the ``percentile`` of the scores inside the
    brain over all healthy validation maps, so about (100 - percentile) % of healthy brain voxels
    score above it.

    ``maps`` are :class:`FilteredMap` objects (their eroded region is used) or arrays restricted
    to ``brain_masks``. The record gives the fraction of healthy voxels actually above.
    """
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {percentile}")
    cases = _validation_cases(maps, brain_masks, "healthy")
    scores = np.concatenate([values[region].astype(np.float64, copy=False) for values, region in cases])
    threshold = float(np.percentile(scores, percentile))
    record = {
        "method": "healthy-percentile",
        "threshold": threshold,
        "percentile": percentile,
        "false_positive_fraction": float(np.count_nonzero(scores > threshold) / scores.size),
        "voxels": int(scores.size),
        "cases": len(cases),
        "rule": "score > threshold",
    }
    return threshold, record
