"""Model space both ways: what the model sees, and maps coming back onto the native grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import GEOMETRIES
from napari_brain_uad.nifti import ScanError, ScanWarning, read_nifti
from napari_brain_uad.preprocess import ModelSpaceSpec, ModelSpaceTransform, to_model_space


def _load(shared_data, geometry):
    image_path, mask_path = GEOMETRIES[geometry]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        scan = read_nifti(shared_data / image_path)
        mask = read_nifti(shared_data / mask_path) if mask_path else None
    return scan, mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_map_made_from_native_mask_comes_back_onto_it(shared_data, geometry):
    scan, mask = _load(shared_data, geometry)
    model = to_model_space(scan, brain_mask=mask)
    native_mask = (mask.data > 0) if mask is not None else scan.data != 0
    # A "map" in model space made from the native mask, then brought back to the native grid.
    model_map = model.transform.to_model(native_mask, antialias=False)
    back = model.transform.to_native(model_map) >= 0.5
    assert back.shape == scan.data.shape
    assert dice(back, native_mask) >= 0.95


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_model_space_is_ras_at_2mm_cropped_to_96x96(shared_data, geometry):
    scan, mask = _load(shared_data, geometry)
    model = to_model_space(scan, brain_mask=mask)
    x, y, z = model.image.shape
    assert (x, y) == (96, 96) and 40 <= z <= 100  # an adult brain is 80-200 mm tall
    assert model.image.dtype == np.float32 and model.brain_mask.shape == model.image.shape
    # Each model axis runs towards R, A, S in the scanner's world, in steps of 2 mm.
    model_to_world = scan.geometry.affine @ model.transform.model_to_native()
    steps = model_to_world[:3, :3]
    assert np.allclose(np.linalg.norm(steps, axis=0), 2.0, atol=1e-6)
    assert steps[0, 0] > 1.9 and steps[1, 1] > 1.9 and steps[2, 2] > 1.9
    # The brain is inside the grid, not cut at its in-plane border.
    assert not model.brain_mask[[0, -1], :, :].any() and not model.brain_mask[:, [0, -1], :].any()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_intensities_are_percentile_normalised_inside_the_brain(shared_data, geometry):
    scan, mask = _load(shared_data, geometry)
    model = to_model_space(scan, brain_mask=mask)
    brain = model.image[model.brain_mask]
    assert model.image.min() == 0.0 and model.image.max() == 1.0
    assert (model.image[~model.brain_mask] == 0).all()
    assert 0.005 <= np.mean(brain == 1.0) <= 0.02  # 1 % above the 99th percentile, clipped
    assert 0.1 < np.median(brain) < 0.9
    restored = model.transform.intensity_to_native(np.array([0.0, 1.0]))
    np.testing.assert_allclose(restored, [model.transform.intensity_low, model.transform.intensity_high])


def test_lesion_mask_survives_the_round_trip(shared_data):
    """MS lesions are small; at 2 mm they still come back where they were."""
    scan = read_nifti(shared_data / "mslub/patient26/T1.nii.gz")
    lesions = read_nifti(shared_data / "mslub/patient26/lesionmask.nii.gz").data > 0
    model = to_model_space(scan)
    back = model.transform.to_native(model.transform.to_model(lesions, antialias=False)) >= 0.5
    assert dice(back, lesions) >= 0.8


def test_transform_record_round_trips_through_json(shared_data):
    import json

    scan, mask = _load(shared_data, "brats-lps")
    transform = to_model_space(scan, brain_mask=mask).transform
    again = ModelSpaceTransform.from_dict(json.loads(json.dumps(transform.to_dict())))
    assert again == transform
    np.testing.assert_array_equal(again.model_to_native(), transform.model_to_native())


def test_other_spec(shared_data):
    scan, mask = _load(shared_data, "ixi-psr-2mm")
    model = to_model_space(scan, brain_mask=mask, spec=ModelSpaceSpec(spacing_mm=3.0, in_plane=(64, 64)))
    assert model.image.shape[:2] == (64, 64)
    assert np.allclose(np.linalg.norm((scan.geometry.affine @ model.transform.model_to_native())[:3, :3], axis=0), 3.0)


def test_mask_of_another_grid_is_refused(shared_data):
    scan = read_nifti(shared_data / "mslub/patient26/T1.nii.gz")
    other = read_nifti(shared_data / "brats2013/pat0001/brainmask.nii.gz")
    with pytest.raises(ScanError, match="brainmask.nii.gz: the brain mask's grid"):
        to_model_space(scan, brain_mask=other)


def test_scan_with_skull_and_no_mask_warns(shared_data):
    scan, _ = _load(shared_data, "ixi-psr-2mm")
    with pytest.warns(ScanWarning, match="does not look skull-stripped"):
        to_model_space(scan)


def test_empty_brain_mask_is_refused(shared_data):
    scan, _ = _load(shared_data, "ixi-psr-2mm")
    with pytest.raises(ScanError, match="brain mask is empty"):
        to_model_space(scan, brain_mask=np.zeros(scan.data.shape))


def test_skull_stripped_scan_needs_no_mask_even_when_z_scored(shared_data):
    """BraTS is z-scored after stripping: its background is a negative constant, not 0."""
    scan = read_nifti(shared_data / "brats2013/pat0001/FLAIR.nii.gz")
    given = read_nifti(shared_data / "brats2013/pat0001/brainmask.nii.gz").data > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanWarning)
        model = to_model_space(scan)
    back = model.transform.to_native(model.brain_mask.astype(np.float32)) >= 0.5
    assert dice(back, given) >= 0.95


# ---------------------------------------------------------------- thick clinical slices


def _thick_clinical_scan(shared_data, every: int = 1):
    """The raw clinical FLAIR (0.72 x 0.72 x 4 mm, LPS) — or, keeping every ``every``-th slice, a
    thicker one — with an ellipsoid "brain" of 130 x 160 x 110 mm in the middle of the head."""
    from napari_brain_uad.nifti import NiftiGeometry, NiftiVolume

    scan = read_nifti(shared_data / "mslub_longitudinal_raw/patient01/FLAIR.nii.gz")
    geometry = scan.geometry
    affine = geometry.affine.copy()
    affine[:3, 2] *= every
    data = scan.data[:, :, ::every]
    geometry = NiftiGeometry(source=geometry.source, affine=affine, shape=data.shape, header=geometry.header)
    centre = (np.asarray(data.shape) - 1) / 2
    grid = np.indices(data.shape).reshape(3, -1).T - centre
    millimetres = grid * np.linalg.norm(affine[:3, :3], axis=0)
    inside = (((millimetres / [65.0, 80.0, 55.0]) ** 2).sum(axis=1) <= 1.0).reshape(data.shape)
    return NiftiVolume(data, geometry), inside


@pytest.mark.parametrize("every", [1, 2])
def test_thick_slices_go_to_model_space_and_back(shared_data, every):
    scan, brain = _thick_clinical_scan(shared_data, every)
    thickness = 4.0 * every
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = to_model_space(scan, brain_mask=brain)
    thick_warnings = [w for w in caught if "thick" in str(w.message)]
    # 4 mm slices are within what the models were measured to handle; 8 mm ones are not.
    assert bool(thick_warnings) == (thickness > 6.0)
    if thick_warnings:
        assert f"{thickness:.3g} mm" in str(thick_warnings[0].message)
    back = model.transform.to_native(model.transform.to_model(brain, antialias=False)) >= 0.5
    assert dice(back, brain) >= 0.95
    # The brain's centre lands where it was, in the scanner's world (mm).
    world = scan.geometry.affine @ np.append(np.argwhere(brain).mean(axis=0), 1.0)
    model_centre = np.append(np.argwhere(model.brain_mask).mean(axis=0), 1.0)
    assert np.allclose(scan.geometry.affine @ model.transform.model_to_native() @ model_centre, world, atol=2.0)
