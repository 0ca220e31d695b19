"""The real-lesion benchmark's own pieces: its native-grid baseline and its list of cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_real_lesions  # noqa: E402
from napari_brain_uad.evaluation import evaluate_filtered  # noqa: E402


def blob_in_a_box(bright: bool):
    """A box-shaped brain on 2D slices (1 × 1 × 5 mm) with a 12 × 12 × 4 blob, brighter (or
    darker) than the noisy tissue around it, and the box eroded by 3 voxels in-plane as region."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 10)
    brain = np.zeros(shape, dtype=bool)
    brain[5:35, 5:35, 1:9] = True
    region = np.zeros(shape, dtype=bool)
    region[8:32, 8:32, 1:9] = True
    lesion = np.zeros(shape, dtype=bool)
    lesion[14:26, 14:26, 3:7] = True
    data = np.where(brain, 100.0 + rng.normal(0.0, 5.0, shape), 0.0)
    data[lesion] += 60.0 if bright else -60.0
    return data.astype(np.float32), brain, region, lesion


@pytest.mark.parametrize("bright", [True, False])
def test_native_baseline_finds_a_blob(bright):
    data, brain, region, lesion = blob_in_a_box(bright)
    filtered = bench_real_lesions.native_intensity_baseline(data, brain, region, (1.0, 1.0, 5.0), bright=bright)
    assert np.array_equal(filtered.region, region)
    assert not filtered.values[~region].any()
    result = evaluate_filtered(filtered, lesion)
    # The 5×5 median only rounds the blob's corners off (3 voxels each, of 144 per slice).
    assert result.best_dice > 0.9
    assert result.auprc > 0.9


def test_median_runs_in_the_plane_of_the_finest_axes():
    assert bench_real_lesions.in_plane_axes((0.9, 0.9, 6.4)) == (0, 1)
    assert bench_real_lesions.in_plane_axes((5.0, 1.0, 1.0)) == (1, 2)
    assert bench_real_lesions.in_plane_axes((1.0, 1.0, 1.0)) == (0, 1)
    # A one-slice-thick lesion survives: nothing is filtered across slices.
    data, brain, region, _ = blob_in_a_box(True)
    data[:, :, 3:7] = np.where(brain[:, :, 3:7], 100.0, 0.0)
    data[14:26, 14:26, 5] = 160.0
    filtered = bench_real_lesions.native_intensity_baseline(data, brain, region, (1.0, 1.0, 5.0))
    assert filtered.values[20, 20, 5] > filtered.values[20, 20, 4]


def test_cases_are_found_in_the_shared_data(shared_data):
    cases = bench_real_lesions.find_cases(shared_data)
    count = {name: sum(case.set == name for case in cases) for name in bench_real_lesions.SETS}
    assert count == {"ms_clinical": 15, "wmh_clinical": 2, "mslub": 3, "brats2013": 3}
    for case in cases:
        assert case.image.is_file() and case.lesion.is_file()
        assert (case.brain_mask is not None) == (case.set in ("ms_clinical", "brats2013"))
    assert {case.contrast for case in cases if case.set == "brats2013"} == {"FLAIR"}
    kept = bench_real_lesions.find_cases(shared_data, ["ms_clinical"], exclude=["104670", "ms_clinical/104899 T1"])
    assert len(kept) == 15 - 3 - 1
