"""Calibrating a model on healthy scans: its thresholds and what a typical scan looks like to it.

One function, :func:`calibrate`, serves both sides:

- shipping a trained model (``brain-uad-calibrate`` of the training module): healthy
  validation scans give the ``healthy-<P>`` threshold and the typicality record; scans with
  lesion masks the ``<name>-dice`` threshold; the card gets its results, limits and training
  command;
- a user's own scanner (``brain-uad calibrate --model NAME --healthy SCANS…``): a handful of
  healthy scans of their scanner, raw or skull-stripped, give a calibrated copy of the model —
  the healthy threshold and typicality measured on their scans — written beside their data,
  never over a bundled model, and optionally registered under a name (``model_registry``'s
  user models) that every door then offers.

Thresholds and typicality are measured exactly as users will apply them: each scan goes through
``analysis.analyse_scan`` with the settings stored beside them, on the post-processed map on
the scan's own grid (``thresholds``, ``typicality``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import AnalysisSettings
from .brain_mask import EXCLUSION_GROWTH_MM, grown_mask
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import OutputExists, SettingsError
from .evaluation import LabelledCase, analyse_cases, evaluate_analysis
from .postprocess import FilteredMap, min_size_in_voxels
from .thresholds import (
    HEALTHY_PERCENTILE,
    dice_threshold_name,
    greedy_dice_threshold,
    healthy_percentile_threshold,
    healthy_threshold_name,
    stored_entry,
)
from .typicality import healthy_record

# Training settings that hold paths of the trainer's machine: a shipped card keeps their names only.
PATH_SETTINGS = ("data", "brain_masks", "output")
# The fewest healthy scans a user calibration takes: fewer give a threshold from one brain's noise.
FEWEST_HEALTHY_SCANS = 3
# A "healthy" scan is called unusual when, at the threshold measured on the other scans, more
# than this many times the false-positive budget of its brain scores above it. Measured with the
# default T1 model (leave one out among 6 held-out IXI scans and 3 of them plus one patient):
# healthy scans 0.65–2.2 % at a 1 % budget, MS patients 4.9–11.8 %; one such scan among three
# healthy ones raised the threshold from 0.072 to 0.093–0.111.
UNUSUAL_SCAN_FACTOR = 4.0


class CalibrationWarning(UserWarning):
    """Something about the scans a calibration was measured on that the user should check."""


def calibrate(
    model_path: str | Path,
    output: str | Path,
    *,
    healthy: Sequence[LabelledCase],
    lesion_cases: Sequence[LabelledCase] = (),
    scorer: str | None = None,
    samples: int | None = None,
    t_test: int | None = None,
    percentile: float = HEALTHY_PERCENTILE,
    lesion_name: str = "lesion",
    card: dict[str, Any] | None = None,
    beside_default: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Write a copy of ``model_path`` at ``output`` with its thresholds, typicality and card;
    returns the card written.

    ``beside_default``: ``scorer`` is calibrated as an option beside the model's default one
    (e.g. the lesion-direction residual): its thresholds are named after it
    (``healthy-99-residual-dark``), and the default scorer, its typicality and the calibration
    record stay as they are.

    ``healthy`` scans give the ``healthy-<percentile>`` threshold and the typicality record; a
    healthy case's ``truth``, when it has one, is an exclusion mask (a patient's lesions, an
    automatic segmenter's WMH): those voxels, grown as the run that trained the model grew them, are
    left out; ``lesion_cases`` (with lesion masks) the ``<lesion_name>-dice`` one and
    the Dice of every threshold on them. ``t_test`` stores a new test-time noise level in a
    diffusion model first. ``card``: entries to add to (or replace in) the card.
    """
    from .models import build_model, load_model

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExists(f"{output}: already exists; not overwriting it")
    if not healthy:
        raise SettingsError("no healthy scans to calibrate on")
    if any(case.truth is None for case in lesion_cases):
        raise SettingsError("every lesion case needs its lesion mask")
    model, metadata = load_model(model_path)
    state, _ = load_checkpoint(model_path)
    if t_test is not None:
        if not model.uses_noise_level:
            raise SettingsError(f"--t-test: a {metadata['kind']} model has no noise level")
        metadata["hyperparameters"] = {**metadata["hyperparameters"], "t_test": t_test}
        rebuilt = build_model(metadata["kind"], metadata["hyperparameters"], model.spec)
        rebuilt.load_state_dict(state)
        model = rebuilt.eval()
    settings = AnalysisSettings.for_model(metadata, scorer=scorer, samples=samples, device=device, seed=0)

    def announce(what):
        return lambda index, count, case: say(f"{what} {index + 1}/{count}: {case.label}")

    # Exclusion masks grow as the run that trained the model grew them.
    growth = float((metadata.get("training") or {}).get("settings", {}).get("exclude_dilation_mm",
                                                                             EXCLUSION_GROWTH_MM))
    healthy_analyses, healthy_maps = [], []
    for case, analysis, excluded in analyse_cases(healthy, model, settings, announce=announce("healthy")):
        healthy_analyses.append(analysis)
        healthy_maps.append(outside_exclusion(analysis.filtered, excluded, growth, case.label))
    subjects = [case.label for case in healthy]
    value, record = healthy_percentile_threshold(healthy_maps, percentile=percentile)
    record["subjects"] = subjects
    unusual = unusual_healthy_scans(healthy_maps, subjects, percentile)
    if unusual:
        record["unusual_scans"] = unusual
    if beside_default and settings.scorer == metadata.get("default_scorer"):
        raise SettingsError(f"{settings.scorer} is the model's default scorer; calibrate it without beside_default")
    suffix = settings.scorer if beside_default else None
    healthy_name = healthy_threshold_name(percentile, suffix)
    thresholds: dict[str, Any] = {healthy_name: stored_entry(value, settings, record)}

    lesion_results = []
    if lesion_cases:
        analysed = [(analysis, truth) for _, analysis, truth in
                    analyse_cases(lesion_cases, model, settings, announce=announce("lesion case"))]
        sizes = [min_size_in_voxels(analysis.default_min_size_ml, analysis.filtered.spacing_mm)
                 for analysis, _ in analysed]
        value, record = greedy_dice_threshold([analysis.filtered for analysis, _ in analysed],
                                              [truth for _, truth in analysed], min_size_voxels=float(np.max(sizes)))
        record["cases"] = [str(case.image) for case in lesion_cases]
        record["note"] = "tuned on the cases it is scored on: an optimistic upper bound, not a held-out result"
        thresholds[dice_threshold_name(lesion_name, suffix)] = stored_entry(value, settings, record)
        for name, entry in thresholds.items():
            dices = [evaluate_analysis(analysis, truth, threshold=entry["value"]).dice for analysis, truth in analysed]
            lesion_results.append({"threshold": name, "dice_per_case": dices, "mean_dice": float(np.mean(dices))})

    written = {key: value for key, value in metadata.items() if key != "format_version"}
    written["training"] = {**written.get("training", {}),
                           "settings": portable_settings(written.get("training", {}).get("settings", {}))}
    # Thresholds stored before for other scorers or lesion sets stay; those measured here replace theirs.
    written["thresholds"] = {**(metadata.get("thresholds") or {}), **thresholds}
    if not beside_default:
        written["default_scorer"] = settings.scorer
        # (The median reconstruction error hardly moves for lesions of a few percent of the brain,
        # so the exclusion masks are not needed there.)
        written["typicality"] = healthy_record(healthy_analyses, settings, subjects)
        if not lesion_cases:  # the Dice measured at an earlier calibration still holds for the thresholds it names
            lesion_results = (metadata.get("calibration") or {}).get("dice_at_thresholds") or []
        written["calibration"] = {"settings": {key: thresholds[healthy_name][key]
                                               for key in ("scorer", "samples", "noise_levels", "median", "seed")},
                                  "source_checkpoint": (metadata.get("calibration") or {}).get("source_checkpoint")
                                  or Path(model_path).name, "dice_at_thresholds": lesion_results}
    written.update(card or {})
    save_checkpoint(output, state, written, overwrite=overwrite)
    return written


def unusual_healthy_scans(maps: Sequence[FilteredMap], labels: Sequence[str], percentile: float) -> dict[str, float]:
    """The scans, among those given as healthy, that the others say are not (a patient's scan
    in the list, another contrast, a failed brain mask): label -> the fraction of its brain above
    the threshold measured on the other scans, when that is over :data:`UNUSUAL_SCAN_FACTOR`
    times the budget. Each is named in a :class:`CalibrationWarning`: one such scan moves the
    threshold for every later analysis, and only the user knows whether it belongs."""
    budget = (100.0 - percentile) / 100.0
    if len(maps) < 3 or budget <= 0:
        return {}  # two scans cannot say which of them is the odd one
    unusual = {}
    for index, label in enumerate(labels):
        others = [scan_map for other, scan_map in enumerate(maps) if other != index]
        threshold, _ = healthy_percentile_threshold(others, percentile=percentile)
        own = maps[index].values[maps[index].region]
        above = float(np.count_nonzero(own > threshold) / max(own.size, 1))
        if above > UNUSUAL_SCAN_FACTOR * budget:
            unusual[label] = above
            warnings.warn(f"{label}: {100 * above:.1f} % of its brain scores above the threshold the other "
                          f"healthy scans give (healthy scans: about {100 * budget:g} %); if it has lesions or "
                          "is not a healthy scan of this scanner and contrast, leave it out and calibrate again",
                          CalibrationWarning, stacklevel=2)
    return unusual


def outside_exclusion(filtered: FilteredMap, excluded: np.ndarray | None, growth_mm: float = EXCLUSION_GROWTH_MM,
                      name: str = "a calibration scan") -> FilteredMap:
    """The filtered map of a calibration scan with its excluded voxels, grown by ``growth_mm``,
    taken out of the region its thresholds and typicality are measured in."""
    if excluded is None or not excluded.any():
        return filtered
    region = filtered.region & ~grown_mask(excluded, filtered.spacing_mm, growth_mm)
    if not region.any():
        raise SettingsError(f"{name}: its exclusion mask covers the whole brain; nothing is left to calibrate on")
    return replace(filtered, region=region)


def calibrate_for_scanner(
    model: str | Path | None,
    healthy: Sequence[LabelledCase],
    output: str | Path,
    *,
    percentile: float = HEALTHY_PERCENTILE,
    device: str = "auto",
    overwrite: bool = False,
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """A user's calibration: the model (a registry name, a path, or None for the default)
    calibrated on ``healthy`` scans of their scanner with its own default scorer and settings,
    written to ``output`` (never into the package). Returns the card written."""
    from .model_registry import bundled_models_folder, resolve_model

    if len(healthy) < FEWEST_HEALTHY_SCANS:
        raise SettingsError(f"{len(healthy)} healthy scan(s) are too few to calibrate on; give at least "
                            f"{FEWEST_HEALTHY_SCANS} of your scanner (more give a steadier threshold)")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise SettingsError(f"{output}: a calibrated model is a .safetensors file")
    if output.resolve().parent == bundled_models_folder().resolve():
        raise SettingsError(f"{output}: is inside the plugin's bundled models; write the calibrated copy beside "
                            "your data instead")
    source = resolve_model(model)
    from .checkpoint import read_metadata

    original = read_metadata(source)
    limits = list(original.get("limits") or [])
    limits.append(f"thresholds and typicality calibrated on {len(healthy)} healthy scans of the user's scanner; "
                  "the results in this card were measured with the original calibration")
    card = {"limits": limits,
            "calibrated_for_scanner": {"from_model": str(model or source.stem), "scans": [c.label for c in healthy],
                                       "date": datetime.now(timezone.utc).date().isoformat()}}
    return calibrate(source, output, healthy=healthy, percentile=percentile, card=card, device=device,
                     overwrite=overwrite, say=say)


def portable_settings(settings: dict) -> dict:
    """Training settings without the trainer's absolute paths (folder names only)."""
    return {key: (Path(value).name if key in PATH_SETTINGS and isinstance(value, str) else value)
            for key, value in settings.items()}
