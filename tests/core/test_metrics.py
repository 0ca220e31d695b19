"""Metrics against scikit-learn's average precision and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from napari_brain_uad.metrics import (
    auprc,
    auprc_pooled,
    best_dice,
    best_dice_pooled,
    dice,
    dice_at,
    l1_inside_outside,
    l1_ratio,
)


@pytest.fixture(scope="module")
def average_precision_score():
    """scikit-learn's average precision, the independent reference (a test-only dependency)."""
    return pytest.importorskip("sklearn.metrics").average_precision_score


# ----------------------------------------------------------------------------------------------
# Dice


def test_dice_hand_computed():
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5  # 2·1 / (2 + 2)
    assert dice([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.8)  # 2·2 / (3 + 2)
    assert dice([0, 0, 0], [1, 0, 0]) == 0.0
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # both empty: defined as 1


def test_dice_at_counts_strictly_above_the_threshold_inside_the_mask():
    scores = np.array([0.1, 0.4, 0.6, 0.9])
    truth = np.array([0, 1, 1, 1])
    assert dice_at(scores, truth, 0.5) == pytest.approx(0.8)  # predicted {2, 3}: 2·2 / (2 + 3)
    assert dice_at(scores, truth, 0.6) == pytest.approx(0.5)  # 0.6 is not above 0.6: {3}
    # Without voxel 1 (a missed lesion voxel) the prediction at 0.5 is perfect.
    assert dice_at(scores, truth, 0.5, mask=[1, 0, 1, 1]) == 1.0


def test_best_dice_hand_computed():
    scores = np.array([0.1, 0.4, 0.6, 0.9])
    truth = np.array([0, 1, 1, 1])
    # Prefixes of the ranking: {0.9} 2/4, {0.9, 0.6} 4/5, {.., 0.4} 6/6, all 6/7.
    value, threshold = best_dice(scores, truth, return_threshold=True)
    assert value == 1.0 and 0.1 < threshold < 0.4
    assert dice_at(scores, truth, threshold) == 1.0
    # Ties enter together: {both 1.0} gives 2·1 / (2 + 1); everything 2 / (4 + 1).
    assert best_dice([1.0, 1.0, 0.0, 0.0], [1, 0, 0, 0]) == pytest.approx(2 / 3)
    # A healthy case: predicting nothing is right.
    value, threshold = best_dice([0.2, 0.5], [0, 0], return_threshold=True)
    assert value == 1.0 and dice_at([0.2, 0.5], [0, 0], threshold) == 1.0


@pytest.mark.parametrize("levels", [None, 7])
def test_best_dice_is_the_maximum_over_every_threshold(levels):
    rng = np.random.default_rng(3)
    truth = rng.random((12, 12, 6)) < 0.15
    scores = truth * 0.6 + rng.random(truth.shape)
    if levels:  # many ties
        scores = np.round(scores * levels) / levels
    mask = rng.random(truth.shape) < 0.8
    value, threshold = best_dice(scores, truth, mask, return_threshold=True)
    # Brute force: every distinct score, predicting it and everything above.
    candidates = [dice(scores[mask] >= s, truth[mask]) for s in np.unique(scores[mask])]
    assert value == pytest.approx(max(candidates), abs=1e-12)
    assert dice_at(scores, truth, threshold, mask) == pytest.approx(value, abs=1e-12)
    for t in np.linspace(scores.min() - 0.1, scores.max() + 0.1, 57):
        assert value >= dice_at(scores, truth, t, mask)


def test_best_dice_pooled_uses_one_threshold_for_all_volumes():
    rng = np.random.default_rng(4)
    truths = [rng.random((8, 8, 4)) < 0.2 for _ in range(3)]
    maps = [t * 0.5 + rng.random(t.shape) + offset for t, offset in zip(truths, (0.0, 0.2, 0.4))]
    value, threshold = best_dice_pooled(maps, truths, return_threshold=True)
    joined_maps = np.concatenate([m.ravel() for m in maps])
    joined_truths = np.concatenate([t.ravel() for t in truths])
    assert value == pytest.approx(best_dice(joined_maps, joined_truths))
    assert dice_at(joined_maps, joined_truths, threshold) == pytest.approx(value)
    # The pooled optimum cannot beat the per-volume optima on average (one threshold vs three).
    assert value <= max(best_dice(m, t) for m, t in zip(maps, truths)) + 1e-12


# ----------------------------------------------------------------------------------------------
# AUPRC


def test_auprc_hand_computed():
    # Ranking 1 0 1 0: precision 1 at recall 1/2, then 2/3 at recall 1.
    assert auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # One tie holding a positive and a negative: one operating point, precision 1/2.
    assert auprc([0.5, 0.5, 0.1], [1, 0, 0]) == pytest.approx(0.5)
    assert auprc([0.3, 0.2], [1, 1]) == 1.0
    assert math.isnan(auprc([0.3, 0.2], [0, 0]))  # no lesion: undefined


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 3, 20])
def test_auprc_equals_sklearn_on_random_and_tied_scores(seed, levels, average_precision_score):
    rng = np.random.default_rng(seed)
    truth = rng.random((16, 16, 8)) < rng.uniform(0.02, 0.5)
    scores = truth * rng.uniform(0, 1) + rng.random(truth.shape)
    if levels:
        scores = np.floor(scores * levels)
    mask = rng.random(truth.shape) < 0.7
    expected = average_precision_score(truth[mask], scores[mask])
    assert auprc(scores, truth, mask) == pytest.approx(expected, abs=1e-12)
    assert auprc(scores, truth) == pytest.approx(
        average_precision_score(truth.ravel(), scores.ravel()), abs=1e-12
    )


def test_pooled_auprc_equals_sklearn_on_the_joined_voxels(average_precision_score):
    rng = np.random.default_rng(7)
    truths = [rng.random((10, 10, 5)) < p for p in (0.05, 0.2, 0.0)]
    maps = [np.round(t * 0.3 + rng.random(t.shape), 2) for t in truths]
    masks = [rng.random(t.shape) < 0.9 for t in truths]
    expected = average_precision_score(
        np.concatenate([t[k] for t, k in zip(truths, masks)]), np.concatenate([m[k] for m, k in zip(maps, masks)])
    )
    assert auprc_pooled(maps, truths, masks) == pytest.approx(expected, abs=1e-12)


def test_metrics_accept_torch_tensors():
    rng = np.random.default_rng(8)
    truth = rng.random((6, 6, 3)) < 0.3
    scores = rng.random(truth.shape).astype(np.float32)
    assert auprc(torch.from_numpy(scores), torch.from_numpy(truth)) == pytest.approx(auprc(scores, truth))
    assert best_dice(torch.from_numpy(scores), torch.from_numpy(truth)) == pytest.approx(best_dice(scores, truth))


@pytest.fixture(scope="module")
def ms_case():
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    from napari_brain_uad.nifti import read_nifti

    folder = SHARED_DATA / "mslub/patient26"
    scans = {name: read_nifti(folder / f"{name}.nii.gz").data for name in ("T1", "FLAIR")}
    lesions = read_nifti(folder / "lesionmask.nii.gz").data > 0
    return scans, lesions, scans["T1"] != 0  # skull-stripped: the brain is where T1 is not 0


@pytest.mark.parametrize("sequence", ["T1", "FLAIR"])
def test_auprc_equals_sklearn_on_a_real_ms_case(ms_case, sequence, average_precision_score):
    scans, lesions, brain = ms_case
    scan = scans[sequence]
    assert lesions[brain].sum() > 1000
    # The intensity itself as a score, inside the brain: about a million voxels, many tied.
    expected = average_precision_score(lesions[brain], scan[brain])
    assert auprc(scan, lesions, brain) == pytest.approx(expected, rel=1e-9)


def test_real_ms_lesions_stand_out_on_flair(ms_case):
    scans, lesions, brain = ms_case
    prevalence = lesions[brain].mean()  # the AUPRC of a random score
    assert auprc(scans["FLAIR"], lesions, brain) > 10 * prevalence
    value, threshold = best_dice(scans["FLAIR"], lesions, brain, return_threshold=True)
    assert dice_at(scans["FLAIR"], lesions, threshold, brain) == pytest.approx(value)
    for t in np.quantile(scans["FLAIR"][brain], [0.5, 0.9, 0.99, 0.995, 0.999]):
        assert value >= dice_at(scans["FLAIR"], lesions, t, brain)


# ----------------------------------------------------------------------------------------------
# l1 and tables


def test_l1_inside_and_outside_lesions_hand_computed():
    image = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    reconstruction = np.ones(5)  # errors 0 1 2 3 4
    truth = np.array([0, 0, 0, 1, 1])
    brain = np.array([0, 1, 1, 1, 1])  # voxel 0 (error 0) is outside the brain
    result = l1_inside_outside(image, reconstruction, truth, brain)
    assert result["l1_inside"] == pytest.approx(3.5)
    assert result["l1_outside"] == pytest.approx(1.5)
    assert result["l1_ratio"] == pytest.approx(7 / 3)
    # With voxel 0 counted the outside mean drops to 1: ratio 3.5.
    assert l1_ratio(image, reconstruction, truth) == pytest.approx(3.5)
    assert math.isnan(l1_ratio(image, reconstruction, np.zeros(5)))  # no lesion


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors():
    scores = np.random.default_rng(0).random((4, 4, 2))
    truth = scores > 0.5
    with pytest.raises(ValueError, match="shape"):
        auprc(scores, truth[:3])
    with pytest.raises(ValueError, match="shape"):
        dice(truth, truth[:, :, :1])
    with pytest.raises(ValueError, match="mask is empty"):
        best_dice(scores, truth, np.zeros_like(truth))
    with pytest.raises(ValueError, match="shape"):
        dice_at(scores, truth, 0.5, mask=np.ones((4, 4)))
    nan_scores = scores.copy()
    nan_scores[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        auprc(nan_scores, truth)
    with pytest.raises(ValueError, match="NaN"):
        dice_at(scores, truth, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        dice(truth, np.where(truth, np.nan, 0.0))
    with pytest.raises(ValueError, match="shape"):
        l1_inside_outside(scores, scores[:2], truth)
    with pytest.raises(ValueError, match="counts differ"):
        auprc_pooled([scores, scores], [truth])


def test_the_precision_recall_curve_is_sklearns_and_its_area_is_auprc():
    from sklearn.metrics import precision_recall_curve as sklearn_curve

    from napari_brain_uad.metrics import auprc, precision_recall_curve

    rng = np.random.default_rng(3)
    truth = rng.random((12, 12, 6)) < 0.1
    scores = np.round(rng.random(truth.shape) + truth * 0.5, 2)  # ties included
    curve = precision_recall_curve(scores, truth)
    precision, recall, thresholds = sklearn_curve(truth.ravel(), scores.ravel())
    # sklearn lists thresholds ascending and appends the (precision 1, recall 0) end point.
    np.testing.assert_allclose(curve["thresholds"], thresholds[::-1])
    np.testing.assert_allclose(curve["precision"], precision[:-1][::-1])
    np.testing.assert_allclose(curve["recall"], recall[:-1][::-1])
    area = np.sum(np.diff(curve["recall"], prepend=0.0) * curve["precision"])
    assert area == pytest.approx(auprc(scores, truth))
