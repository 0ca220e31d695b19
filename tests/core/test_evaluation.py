"""Evaluation: one protocol for every door, and Dice on exactly the mask a user exports."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.cli import main
from napari_brain_uad.errors import BrainUADError
from napari_brain_uad.evaluation import (
    LabelledCase,
    evaluate_analysis,
    evaluate_cases,
    evaluate_filtered,
    evaluate_map,
    flagged_fraction,
    mean_row,
    read_case,
)
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.metrics import auprc, best_dice, dice
from napari_brain_uad.model_registry import resolve_model
from napari_brain_uad.models import load_model
from napari_brain_uad.postprocess import prepare
from napari_brain_uad.thresholds import resolve_threshold

MSLUB = SHARED_DATA / "mslub/patient26"


def _speckled_map():
    """A map with one 27-voxel lesion scoring 0.9 and, elsewhere, isolated voxels scoring 0.8."""
    shape = (24, 24, 12)
    values = np.full(shape, 0.1, dtype=np.float32)
    truth = np.zeros(shape, dtype=bool)
    truth[10:13, 10:13, 5:8] = True
    values[truth] = 0.9
    for x, y, z in [(4, 4, 2), (18, 5, 9), (5, 18, 4), (19, 19, 6)]:
        values[x, y, z] = 0.8  # single-voxel findings: the user's mask drops them
    brain = np.ones(shape, dtype=bool)
    return prepare(values, brain, median=False, iterations=0), truth


def test_dice_at_a_threshold_is_the_dice_of_the_mask_the_user_exports():
    filtered, truth = _speckled_map()
    result = evaluate_filtered(filtered, truth, threshold=0.5, min_size_ml=7 * 0.008)
    exported = filtered.mask_at(0.5, min_size_ml=7 * 0.008)
    assert result.dice == dice(exported, truth) == 1.0  # the speckles are gone, as in the export
    assert dice(filtered.values > 0.5, truth) < 1.0  # thresholding alone would have kept them
    assert result.precision == 1.0 and result.recall == 1.0
    assert result.best_dice == best_dice(filtered.values, truth, filtered.region)
    assert result.auprc == auprc(filtered.values, truth, filtered.region)
    assert result.prevalence == pytest.approx(truth.mean())
    assert flagged_fraction(filtered, 0.5) == pytest.approx((27 + 4) / truth.size)


def test_a_map_from_a_file_counts_its_non_zero_voxels():
    values = np.zeros((10, 10, 4), dtype=np.float32)
    values[2:8, 2:8] = 0.2
    values[4:6, 4:6, 1:3] = 0.7
    truth = values > 0.5
    result = evaluate_map(values, truth, threshold=0.5)
    assert result.dice == 1.0 and result.best_dice == 1.0
    assert result.prevalence == pytest.approx(truth.sum() / (values != 0).sum())
    with pytest.raises(BrainUADError, match="every voxel is zero"):
        evaluate_map(np.zeros_like(values), truth)


def test_the_mean_row_skips_undefined_values():
    rows = [{"case": "ms", "auprc": 0.4, "dice": 0.8, "lesion_voxels": 3},
            {"case": "healthy", "auprc": float("nan"), "dice": 0.0, "lesion_voxels": 0}]
    mean = mean_row(rows)
    assert mean["cases"] == 2 and mean["auprc"] == pytest.approx(0.4)
    assert mean["dice"] == pytest.approx(0.4) and mean["lesion_voxels"] == 1.5
    assert math.isnan(mean_row([rows[1]])["auprc"])


def test_a_lesion_mask_on_another_grid_is_refused(shared_data, tmp_path):
    scan = nib.load(MSLUB / "T1.nii.gz")
    affine = scan.affine.copy()
    affine[0, 3] += 2.0  # same shape, moved 2 mm: it would overlay the wrong voxels
    nib.save(nib.Nifti1Image(np.ones(scan.shape, np.uint8), affine), tmp_path / "shifted.nii.gz")
    with pytest.raises(BrainUADError, match="not on the grid"):
        read_case(LabelledCase(MSLUB / "T1.nii.gz", tmp_path / "shifted.nii.gz"))


def _assert_same_row(row: dict, expected: dict) -> None:
    assert row.keys() == expected.keys() and row["case"] == expected["case"]
    for key in expected.keys() - {"case"}:
        assert row[key] == pytest.approx(expected[key], rel=1e-12), key


@pytest.fixture(scope="module")
def default_model():
    path = resolve_model()
    return path, *load_model(path)


def test_cli_and_evaluation_module_give_the_same_numbers_on_a_real_case(shared_data, default_model, tmp_path):
    """`brain-uad evaluate` with the bundled model on the MS patient, against the evaluation
    module called directly and against the metrics computed by hand from one analysis."""
    path, model, metadata = default_model
    out = tmp_path / "results.json"
    assert main(["evaluate", "--images", str(MSLUB / "T1.nii.gz"), "--masks", str(MSLUB / "lesionmask.nii.gz"),
                 "--json", str(out), "--quiet"]) == 0
    document = json.loads(out.read_text())

    settings = AnalysisSettings.for_model(metadata)
    threshold = resolve_threshold(None, metadata, settings)
    assert document["scorer"] == settings.scorer and document["threshold"]["name"] == threshold.name
    cohort = evaluate_cases([LabelledCase(MSLUB / "T1.nii.gz", MSLUB / "lesionmask.nii.gz", name="T1.nii.gz")],
                            model, settings, threshold=threshold)
    row = document["cases"][0]
    _assert_same_row(row, cohort.rows[0])
    assert document["pooled"] == pytest.approx(cohort.pooled)

    # By hand: Dice of the mask `brain-uad score --out-mask` writes, inside the eroded brain.
    scan = read_nifti(MSLUB / "T1.nii.gz")
    truth = read_nifti(MSLUB / "lesionmask.nii.gz").data > 0
    analysis = analyse_scan(scan, model, settings=settings)
    region = analysis.filtered.region
    assert row["dice"] == pytest.approx(dice(analysis.mask_at(threshold.value), truth & region))
    assert row["best_dice"] == pytest.approx(best_dice(analysis.filtered.values, truth, region))
    assert row["auprc"] == pytest.approx(auprc(analysis.filtered.values, truth, region))
    _assert_same_row(evaluate_analysis(analysis, truth, threshold=threshold.value, name="T1.nii.gz").row(),
                     cohort.rows[0])
    # The map points at the lesions better than chance, as docs/models.md says.
    assert row["auprc"] > 2 * cohort.cases[0].prevalence
