"""Post-processing: median, erosion, thresholds, components and findings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import SHARED_DATA, box_mask
from napari_brain_uad.metrics import best_dice, dice
from napari_brain_uad.postprocess import (
    FilteredMap,
    erode_brain_mask,
    erosion_iterations,
    findings_table,
    postprocess,
    prepare,
    remove_small_components,
)
from napari_brain_uad.thresholds import greedy_dice_threshold


def _unfiltered(score_map, brain_mask=None) -> FilteredMap:
    """A FilteredMap without median or erosion, so thresholds act on the values as given."""
    brain_mask = np.ones(score_map.shape, bool) if brain_mask is None else brain_mask
    return prepare(score_map, brain_mask, median=False, iterations=0)


# ----------------------------------------------------------------------------------------------
# median and erosion


def test_erosion_iterations_follow_the_in_plane_size():
    assert erosion_iterations((96, 96)) == 3
    assert erosion_iterations(96) == 3
    assert erosion_iterations((64, 64)) == 2 and erosion_iterations((128, 100)) == 4
    assert prepare(np.zeros((96, 96, 4)), box_mask((96, 96, 4), 20)).iterations == 3


def test_erosion_is_a_2d_cross_per_axial_slice():
    mask = np.zeros((96, 96, 5), dtype=bool)
    mask[20:41, 30:51, 1:4] = True  # 21 x 21 squares on three slices
    mask[60, 60, 2] = True  # a lone voxel
    eroded = erode_brain_mask(mask)  # 3 iterations at 96²
    expected = np.zeros_like(mask)
    expected[23:38, 33:48, 1:4] = True  # a cross shrinks a square by one voxel per side and step
    np.testing.assert_array_equal(eroded, expected)  # nothing eroded across slices
    # One step with a cross removes the corners of a 3 x 3 plus shape but keeps its centre.
    plus = np.zeros((5, 5, 1), bool)
    plus[1:4, 2, 0] = plus[2, 1:4, 0] = True
    assert erode_brain_mask(plus, 1)[:, :, 0].sum() == 1 and erode_brain_mask(plus, 1)[2, 2, 0]


def test_prepare_median_filters_then_zeroes_outside_the_eroded_mask():
    rng = np.random.default_rng(0)
    score_map = rng.random((96, 96, 12)).astype(np.float32)
    brain = box_mask((96, 96, 12), 10)
    filtered = prepare(score_map, brain)
    region = erode_brain_mask(brain, 3)
    np.testing.assert_array_equal(filtered.region, region)
    assert (filtered.values[~region] == 0).all() and filtered.values.dtype == np.float32
    # Independent check of the 5 x 5 x 5 median at a few voxels.
    for x, y, z in [(30, 40, 5), (13, 13, 2), (82, 60, 9)]:
        assert region[x, y, z]
        window = score_map[x - 2 : x + 3, y - 2 : y + 3, max(z - 2, 0) : z + 3]
        if z >= 2 and z + 3 <= 12:
            assert filtered.values[x, y, z] == np.median(window)
    # median=False keeps the values; erosion still applies.
    plain = prepare(score_map, brain, median=False)
    np.testing.assert_array_equal(plain.values[region], score_map[region])
    # A torch tensor works the same.
    from_tensor = prepare(torch.from_numpy(score_map), torch.from_numpy(brain), median=False)
    np.testing.assert_array_equal(from_tensor.values, plain.values)


# ----------------------------------------------------------------------------------------------
# components


def _two_blobs_8_and_7() -> np.ndarray:
    mask = np.zeros((20, 20, 20), dtype=bool)
    for i in range(8):  # 8 voxels touching only diagonally (corner neighbours)
        mask[1 + i, 1 + i, 1 + i] = True
    for i in range(7):  # 7 voxels, also diagonal, far from the first
        mask[12 + i, 2, 12 + i] = True
    return mask


def test_components_of_8_voxels_stay_and_of_7_go_with_26_connectivity():
    mask = _two_blobs_8_and_7()
    kept = remove_small_components(mask)
    expected = mask.copy()
    expected[12:, :, 12:] = False
    np.testing.assert_array_equal(kept, expected)
    # Through FilteredMap.mask_at, sizes in voxels or in mL (2 mm voxels: 0.008 mL each).
    filtered = _unfiltered(mask.astype(np.float32))
    np.testing.assert_array_equal(filtered.mask_at(0.5), expected)
    np.testing.assert_array_equal(filtered.mask_at(0.5, min_size_ml=7 * 0.008), expected)
    assert not filtered.mask_at(0.5, min_size_ml=8 * 0.008).any()
    np.testing.assert_array_equal(filtered.mask_at(0.5, min_size_voxels=0), mask)
    # At 1 mm a voxel is 0.001 mL: 0.007 mL drops the 7-voxel chain, 0.006 mL neither.
    fine = prepare(mask.astype(np.float32), np.ones(mask.shape), median=False, iterations=0, spacing_mm=1.0)
    np.testing.assert_array_equal(fine.mask_at(0.5, min_size_ml=0.007), expected)
    np.testing.assert_array_equal(fine.mask_at(0.5, min_size_ml=0.006), mask)


def test_mask_at_matches_thresholding_the_full_volume_and_is_monotone():
    rng = np.random.default_rng(1)
    brain = box_mask((96, 96, 20), 12)
    filtered = prepare(rng.normal(size=brain.shape), brain)
    low, high = filtered.score_range()
    previous = None
    for threshold in np.linspace(low - 1, high + 0.1, 25):
        mask = filtered.mask_at(threshold)
        reference = remove_small_components((filtered.values > threshold) & filtered.region, 7)
        np.testing.assert_array_equal(mask, reference)
        assert not mask[~filtered.region].any()  # also for thresholds below every score
        if previous is not None:
            assert not (mask & ~previous).any()  # a higher threshold only removes voxels
        previous = mask
    assert not filtered.mask_at(high).any()  # strictly above the threshold


def test_labels_and_findings_table():
    score_map = np.zeros((30, 30, 10), dtype=np.float32)
    score_map[2:5, 2:5, 2:4] = 0.8  # 18 voxels
    score_map[3, 3, 3] = 0.95
    score_map[20:25, 10:15, 5:8] = 0.6  # 75 voxels
    score_map[15, 15, 5] = 0.9  # a lone voxel, dropped
    filtered = _unfiltered(score_map)
    labels = filtered.labels_at(0.5)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    rows = filtered.findings(0.5)
    assert [row["label"] for row in rows] == [1, 2]  # largest first
    big, small = rows
    assert big["voxels"] == 75 and big["volume_ml"] == pytest.approx(75 * 0.008)
    assert big["mean_score"] == pytest.approx(0.6) and big["max_score"] == pytest.approx(0.6)
    assert big["centre_voxel"] == pytest.approx([22.0, 12.0, 6.0])
    assert small["voxels"] == 18 and small["max_score"] == pytest.approx(0.95)
    assert small["mean_score"] == pytest.approx((17 * 0.8 + 0.95) / 18)
    assert small["centre_voxel"] == pytest.approx([3.0, 3.0, 2.5])
    assert (labels > 0).sum() == filtered.mask_at(0.5).sum() == 93
    json.dumps(rows)
    assert findings_table(np.zeros((3, 3, 3), int), np.zeros((3, 3, 3))) == []
    # The one-call form gives the same mask.
    np.testing.assert_array_equal(
        postprocess(score_map, np.ones(score_map.shape), 0.5, median=False) > 0,
        prepare(score_map, np.ones(score_map.shape), median=False).mask_at(0.5),
    )


# ----------------------------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def ms_model_space():
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    from napari_brain_uad.nifti import read_nifti
    from napari_brain_uad.preprocess import to_model_space

    folder = SHARED_DATA / "mslub/patient26"
    model = to_model_space(read_nifti(folder / "FLAIR.nii.gz"))
    lesions = read_nifti(folder / "lesionmask.nii.gz").data > 0
    return model, model.transform.to_model(lesions, antialias=False) >= 0.5


def test_real_ms_case_from_flair_to_findings(ms_model_space):
    model, lesions = ms_model_space
    # MS lesions are bright on FLAIR: the intensity itself is a (crude) anomaly map.
    filtered = prepare(model.image, model.brain_mask)
    assert filtered.iterations == 3 and filtered.region.sum() < model.brain_mask.sum()
    threshold, record = greedy_dice_threshold(filtered, [lesions])
    upper_bound, best_threshold = best_dice(filtered.values, lesions, filtered.region, return_threshold=True)
    # The metrics' threshold means the same on the FilteredMap (float32 scores, float64 threshold).
    assert dice(filtered.mask_at(best_threshold, 0), lesions & filtered.region) == pytest.approx(upper_bound)
    assert 0.2 < record["dice"] <= upper_bound + 1e-12
    assert record["dice"] >= upper_bound - 0.02
    mask = filtered.mask_at(threshold)
    rows = filtered.findings(threshold)
    assert sum(row["voxels"] for row in rows) == mask.sum() and all(row["voxels"] > 7 for row in rows)
    assert dice(mask, lesions) > 0.2


def _labels_by_hand(filtered: FilteredMap, threshold: float, min_size_voxels: float) -> np.ndarray:
    """The kept components as the papers' code finds them: the whole volume labelled with
    26-connectivity, components of at most the minimum size dropped, the rest numbered from the
    largest (ties in raster order of their first voxel)."""
    labels, _ = ndimage.label((filtered.values > np.float64(threshold)) & filtered.region, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())
    kept = [label for label in range(1, sizes.size) if sizes[label] > min_size_voxels]
    kept.sort(key=lambda label: -sizes[label])  # sort is stable: ties stay in raster order
    numbered = np.zeros(sizes.size, np.int32)
    numbered[kept] = np.arange(1, len(kept) + 1)
    return numbered[labels]


def test_findings_on_a_real_map_are_those_of_labelling_the_whole_volume(ms_model_space):
    """A slider step finds components on a graph of the voxels above the threshold when they are
    few, and labels the brain's box otherwise: at every threshold, from the top of the scores to
    below them all, both must give exactly the components, sizes and numbers of labelling the
    whole volume."""
    model, _ = ms_model_space
    filtered = prepare(model.image, model.brain_mask)
    scores = filtered.scores()
    share_above = []
    for percentile in (99.99, 99.9, 99.5, 99, 98, 96, 93, 90, 80, 50, 0):
        threshold = float(np.percentile(scores, percentile))
        for min_size in (7, 0, 40):
            expected = _labels_by_hand(filtered, threshold, min_size)
            np.testing.assert_array_equal(filtered.labels_at(threshold, min_size), expected)
            np.testing.assert_array_equal(filtered.mask_at(threshold, min_size), expected > 0)
        share_above.append(np.count_nonzero(scores > threshold) / filtered._padded_scores.size)
    # Both ways were taken (the share that switches between them is postprocess._SPARSE_SHARE).
    assert min(share_above) < 0.01 and max(share_above) > 0.2


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors():
    score_map = np.random.default_rng(0).random((32, 32, 8))
    brain = box_mask()
    with pytest.raises(ValueError, match="shape"):
        prepare(score_map, brain[:, :, :4])
    with pytest.raises(ValueError, match="empty"):
        prepare(score_map, np.zeros_like(brain))
    with pytest.raises(ValueError, match="empty after 1 erosion"):
        tiny = np.zeros_like(brain)
        tiny[10, 10, 4] = True
        prepare(score_map, tiny)
    nan_map = score_map.copy()
    nan_map[5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare(nan_map, brain)
    with pytest.raises(ValueError, match="3D"):
        prepare(score_map[:, :, 0], brain[:, :, 0])
    filtered = prepare(score_map, brain)
    with pytest.raises(ValueError, match="NaN"):
        filtered.mask_at(float("nan"))
    with pytest.raises(ValueError, match="spacing"):
        prepare(score_map, brain, spacing_mm=(2.0, 0.0, 2.0))


def test_a_part_added_after_the_median_is_left_alone_by_it():
    """SADM's rule: median(map − part) + part, so a one-slice-thick part survives intact."""
    rng = np.random.default_rng(0)
    unsupervised = rng.random((20, 20, 12)).astype(np.float32)
    part = np.zeros_like(unsupervised)
    part[5:15, 5:15, 6] = 1.0  # one slice thick: a 5³ median of it alone is 0 everywhere
    brain = np.ones(unsupervised.shape, dtype=bool)
    filtered = prepare(unsupervised + part, brain, iterations=0, added_after_median=part)
    expected = ndimage.median_filter(unsupervised, size=5) + part
    np.testing.assert_allclose(filtered.values, expected, atol=1e-6)
    assert not prepare(unsupervised + part, brain, iterations=0).values[5:15, 5:15, 6].max() > 1.0
    with pytest.raises(ValueError, match="shape"):
        prepare(unsupervised, brain, added_after_median=part[:, :, :6])
