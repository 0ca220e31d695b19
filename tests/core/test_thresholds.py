"""Thresholds: their stored format, which ones apply to a scorer, what a user's choice means,
and how they are chosen on validation data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from napari_brain_uad.analysis import AnalysisSettings
from napari_brain_uad.errors import BrainUADError
from napari_brain_uad.metrics import best_dice_pooled, dice, dice_at
from napari_brain_uad.postprocess import prepare
from napari_brain_uad.thresholds import (
    StoredThreshold,
    default_threshold,
    greedy_dice_threshold,
    healthy_percentile_threshold,
    healthy_threshold_name,
    resolve_threshold,
    stored_entry,
    stored_thresholds,
)

from conftest import box_mask


# ----------------------------------------------------------------------------------------------
# stored with the model


def _card(**thresholds) -> dict:
    return {"default_scorer": "ssim-ens", "thresholds": thresholds}


def test_a_stored_entry_reads_back_with_the_settings_it_holds_for():
    settings = AnalysisSettings(scorer="mhd-full", samples=10)
    entry = stored_entry(1.25, settings, {"method": "healthy-percentile", "percentile": 99.0})
    json.dumps(entry)
    threshold = StoredThreshold.from_entry("healthy-99", entry, default_scorer=None)
    assert threshold.value == 1.25 and threshold.scorer == "mhd-full" and threshold.is_healthy_percentile
    assert threshold.differences(settings) == []
    changed = threshold.differences(AnalysisSettings(scorer="mhd-full", samples=5, median=False))
    assert len(changed) == 2 and "samples = 10" in changed[0] and "median = True" in changed[1]


def test_thresholds_belong_to_the_scorer_they_were_calibrated_for():
    metadata = _card(**{
        "healthy-99": {"value": 0.3, "scorer": "residual", "method": "healthy-percentile"},
        "mslub-dice": {"value": 0.5, "scorer": "residual", "method": "greedy-dice"},
        "old-style": 0.1,  # a bare number, no scorer: it is for the model's default scorer
        "no-scorer": {"value": 0.2},
    })
    assert {name: t.value for name, t in stored_thresholds(metadata, "residual").items()} == \
        {"healthy-99": 0.3, "mslub-dice": 0.5}
    assert {name: t.value for name, t in stored_thresholds(metadata, "ssim-ens").items()} == \
        {"old-style": 0.1, "no-scorer": 0.2}
    assert default_threshold(metadata, "residual").name == "healthy-99"
    assert default_threshold(metadata, "ssim-ens") is None  # neither is a healthy percentile
    # A model that names no default scorer: a threshold without a scorer applies to any.
    assert list(stored_thresholds({"thresholds": {"t": 0.4}}, "mhd-full")) == ["t"]


@pytest.mark.parametrize("scorer", ["residual", "ssim-ens", "mhd-full"])
def test_the_cli_accepts_exactly_the_thresholds_the_widget_lists(scorer):
    """One answer for both doors: every listed name resolves to its value; no other name does."""
    metadata = _card(**{
        "healthy-99": {"value": 0.3, "scorer": "residual", "samples": 1},
        "old-style": 0.1,
        "mhd": {"value": 2.0, "scorer": "mhd-full", "samples": 10},
    })
    settings = AnalysisSettings.for_model(metadata, scorer=scorer)
    listed = stored_thresholds(metadata, scorer)
    for name in ("healthy-99", "old-style", "mhd"):
        if name in listed:
            assert resolve_threshold(name, metadata, settings).value == listed[name].value
        else:
            with pytest.raises(BrainUADError, match="calibrated for scorer"):
                resolve_threshold(name, metadata, settings)


def test_resolving_a_number_a_name_or_the_default():
    metadata = _card(**{healthy_threshold_name(): {"value": 0.3, "scorer": "ssim-ens", "samples": 1,
                                                   "method": "healthy-percentile"}})
    settings = AnalysisSettings.for_model(metadata)
    assert settings.scorer == "ssim-ens" and settings.samples == 1
    assert resolve_threshold("0.25", metadata, settings).value == 0.25
    assert resolve_threshold(0.25, metadata, settings).name is None
    chosen = resolve_threshold(None, metadata, settings)
    assert (chosen.name, chosen.value) == ("healthy-99", 0.3)
    assert resolve_threshold(None, metadata, AnalysisSettings(scorer="residual")) is None
    with pytest.raises(BrainUADError, match="neither a number"):
        resolve_threshold("nonsense", metadata, settings)
    with pytest.warns(UserWarning, match="calibrated with samples = 1, this run uses 3"):
        resolve_threshold("healthy-99", metadata, AnalysisSettings(scorer="ssim-ens", samples=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_threshold("healthy-99", metadata, settings)  # same settings: no warning


def test_the_default_number_of_samples_follows_the_scorer():
    assert AnalysisSettings.for_model({}, scorer="mhd-full").samples == 10
    assert AnalysisSettings.for_model({}, scorer="residual").samples == 1
    assert AnalysisSettings.for_model({"default_scorer": "mhd-diag"}).samples == 10
    assert AnalysisSettings.for_model({}, scorer="mhd-full", samples=4).samples == 4
    with pytest.raises(BrainUADError, match="unknown scorer"):
        AnalysisSettings.for_model({}, scorer="nope")


# ----------------------------------------------------------------------------------------------
# threshold choice


def _synthetic_cases(seed, count=2, separation=1.5, shape=(24, 24, 8)):
    rng = np.random.default_rng(seed)
    maps, labels = [], []
    for _ in range(count):
        label = np.zeros(shape, dtype=bool)
        centre = rng.integers(6, 18, size=2)
        label[centre[0] - 4 : centre[0] + 4, centre[1] - 4 : centre[1] + 4, 2:6] = True
        maps.append(rng.normal(size=shape) + separation * label)
        labels.append(label)
    return maps, labels


def test_greedy_threshold_separates_separable_maps():
    maps, labels = _synthetic_cases(0, separation=0.0)
    maps = [np.where(label, 0.6 + 0.4 * np.abs(np.tanh(m)), 0.4 * np.abs(np.tanh(m))) for m, label in zip(maps, labels)]
    threshold, record = greedy_dice_threshold(maps, labels)
    highest_healthy = max(m[~label].max() for m, label in zip(maps, labels))
    lowest_lesion = min(m[label].min() for m, label in zip(maps, labels))
    assert highest_healthy <= threshold < lowest_lesion and record["dice"] == 1.0
    assert all(dice_at(m, label, threshold) == 1.0 for m, label in zip(maps, labels))


def _quantile_cases(shifts=(1.5, 2.0), shape=(24, 24, 8)):
    """Maps whose healthy and lesion scores are evenly spaced quantiles of two overlapping
    normal distributions (placed at random): Dice against the threshold is a smooth curve with
    one peak, so the exact optimum is the one to find."""
    rng = np.random.default_rng(0)
    maps, labels = [], []
    for shift in shifts:
        label = np.zeros(shape, dtype=bool)
        label[6:14, 8:16, 2:6] = True
        lesion_count = int(label.sum())
        healthy_count = label.size - lesion_count
        score_map = np.empty(shape)
        score_map[~label] = rng.permutation(norm.ppf((np.arange(healthy_count) + 0.5) / healthy_count))
        score_map[label] = rng.permutation(shift + norm.ppf((np.arange(lesion_count) + 0.5) / lesion_count))
        maps.append(score_map)
        labels.append(label)
    return maps, labels


def test_greedy_threshold_finds_the_optimum_of_overlapping_maps():
    maps, labels = _quantile_cases()
    threshold, record = greedy_dice_threshold(maps, labels)
    # Exact optimum of the mean Dice: every distinct score as a threshold, brute force.
    candidates = np.unique(np.concatenate([m.ravel() for m in maps]))
    mean_dice = [np.mean([dice(m >= c, label) for m, label in zip(maps, labels)]) for c in candidates]
    assert record["dice"] == pytest.approx(max(mean_dice), abs=1e-3)
    assert record["dice"] == pytest.approx(np.mean([dice_at(m, l, threshold) for m, l in zip(maps, labels)]))
    # Pooled objective against the exact pooled [Dice].
    pooled_threshold, pooled = greedy_dice_threshold(maps, labels, objective="pooled")
    exact, exact_threshold = best_dice_pooled(maps, labels, return_threshold=True)
    assert pooled["dice"] == pytest.approx(exact, abs=1e-3)
    assert pooled_threshold == pytest.approx(exact_threshold, abs=0.05)
    json.dumps(record)
    assert record["method"] == "greedy-dice" and record["threshold"] == threshold


def test_greedy_threshold_on_filtered_maps_uses_their_region():
    maps, labels = _synthetic_cases(3, shape=(48, 48, 10))
    brain = box_mask((48, 48, 10), 2)
    filtered = [prepare(m, brain, median=False) for m in maps]
    threshold, record = greedy_dice_threshold(filtered, labels, min_size_voxels=7)
    assert record["min_size_voxels"] == 7 and record["cases"] == 2
    dices = [dice(f.mask_at(threshold, 7), label & f.region) for f, label in zip(filtered, labels)]
    assert record["dice"] == pytest.approx(np.mean(dices))


@pytest.mark.parametrize("percentile", [95.0, 99.0, 99.9])
def test_percentile_threshold_spends_the_false_positive_budget(percentile):
    rng = np.random.default_rng(5)
    brain = box_mask((64, 64, 16), 6)
    healthy = [rng.gamma(2.0, size=brain.shape) * (1 + 0.2 * i) for i in range(3)]
    threshold, record = healthy_percentile_threshold(healthy, [brain] * 3, percentile=percentile)
    scores = np.concatenate([h[brain] for h in healthy])
    above = np.mean(scores > threshold)
    assert above == pytest.approx(1 - percentile / 100, abs=1e-4)
    assert record["false_positive_fraction"] == pytest.approx(above)
    assert record["voxels"] == scores.size and record["percentile"] == percentile
    json.dumps(record)
    # On FilteredMaps only the eroded region counts.
    filtered = [prepare(h, brain) for h in healthy]
    threshold, record = healthy_percentile_threshold(filtered, percentile=percentile)
    region_scores = np.concatenate([f.values[f.region] for f in filtered])
    assert np.mean(region_scores > threshold) == pytest.approx(1 - percentile / 100, abs=1e-3)




def test_threshold_searches_refuse_bad_inputs():
    score_map = np.random.default_rng(0).random((32, 32, 8))
    brain = box_mask()
    nan_map = score_map.copy()
    nan_map[5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="label masks"):
        greedy_dice_threshold([score_map, score_map], [brain])
    with pytest.raises(ValueError, match="shape"):
        greedy_dice_threshold([score_map], [brain[:, :, :2]])
    with pytest.raises(ValueError, match="NaN"):
        greedy_dice_threshold([nan_map], [brain])
    with pytest.raises(ValueError, match="percentile"):
        healthy_percentile_threshold([score_map], [brain], percentile=101)
    with pytest.raises(ValueError, match="empty"):
        healthy_percentile_threshold([score_map], [np.zeros_like(brain)])


@pytest.mark.parametrize("kind, scorer", [
    ("vae3d", "residual"),  # the thesis's 3D VAE scores with the l1 residual
    ("maediff", "residual"),  # so does MAEDiff
    ("sadm", "ssim+segmentation"),
    ("phanes", "phanes"),
    ("dae", "ssim-ens"),  # a kind without a scorer of its own: the thesis's best single-reconstruction score
])
def test_an_uncalibrated_checkpoint_is_scored_as_its_paper_scores_it(kind, scorer):
    assert AnalysisSettings.for_model({"kind": kind}).scorer == scorer
    # A calibrated card's own scorer wins.
    assert AnalysisSettings.for_model({"kind": kind, "default_scorer": "ssim"}).scorer == "ssim"
