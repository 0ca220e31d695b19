"""Where the brain is: the user's mask, a skull-stripped scan's own brain, or an extraction —
and never a mask that is not brain-sized."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_brain_uad.brain_mask import (
    EXTRACTED,
    GIVEN,
    LEAST_NEIGHBOUR_CORRELATION,
    MOST_BRAIN_FILL,
    SKULL_STRIPPED,
    BrainMask,
    box_fill,
    check_brain_size,
    find_brain,
    neighbour_correlation,
    voxel_ml,
)
from napari_brain_uad.nifti import NiftiGeometry, NiftiVolume, ScanError, ScanWarning, read_nifti

RAW_IXI = "ixi_t1/IXI049-HH-1358_T1.nii.gz"
IXI_MASK = "ixi_t1/brainmask/IXI049-HH-1358_brainmask.nii.gz"


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _part(scan: NiftiVolume, axis: int, keep: np.ndarray) -> NiftiVolume:
    """The scan cut to the slices ``keep`` along ``axis`` (the affine moved to the first)."""
    affine = scan.geometry.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.eye(3)[axis] * keep[0] + affine[:3, 3]
    data = np.take(scan.data, keep, axis=axis)
    geometry = NiftiGeometry(source=f"{scan.path} (part)", affine=affine, shape=data.shape, header=scan.geometry.header)
    return NiftiVolume(data, geometry)


def test_the_users_mask_comes_first(shared_data):
    scan = read_nifti(shared_data / RAW_IXI)
    given = read_nifti(shared_data / IXI_MASK)
    found = find_brain(scan, given)
    assert found.source == GIVEN and np.array_equal(found.mask, given.data > 0)
    assert found.volume_ml == pytest.approx(np.count_nonzero(given.data) * 8 / 1000)


def test_a_skull_stripped_scan_is_its_own_brain(shared_data):
    scan = read_nifti(shared_data / "mslub/patient26/T1.nii.gz")
    found = find_brain(scan)
    assert found.source == SKULL_STRIPPED and np.array_equal(found.mask, scan.data != 0)
    assert 1000 < found.volume_ml < 2000


def test_a_raw_scan_has_its_brain_extracted(shared_data):
    scan = read_nifti(shared_data / RAW_IXI)
    found = find_brain(scan)
    assert found.source == EXTRACTED and "deepbet" in found.describe()
    assert dice(found.mask, read_nifti(shared_data / IXI_MASK).data > 0) > 0.97


def test_a_raw_clinical_scan_with_thick_slices_has_its_brain_extracted(shared_data):
    scan = read_nifti(shared_data / "mslub_longitudinal_raw/patient01/T1W.nii.gz")
    found = find_brain(scan)
    assert found.source == EXTRACTED and 1100 < found.volume_ml < 1700  # measured: 1346 mL


def test_a_slab_below_the_brain_is_refused_saying_why(shared_data):
    """The extractor finds a 0.8 L "brain" in the neck; its extent gives it away."""
    scan = read_nifti(shared_data / RAW_IXI)
    reference = read_nifti(shared_data / IXI_MASK).data > 0
    superior = int(np.argmax(np.abs(scan.geometry.affine[2, :3])))  # index grows upwards here
    brain_slices = np.flatnonzero(reference.any(axis=tuple(a for a in range(3) if a != superior)))
    neck = _part(scan, superior, np.arange(0, brain_slices.min()))
    with pytest.raises(ScanError, match=r"spans only \d+ mm"):
        find_brain(neck)


def test_masks_that_are_not_brain_sized_are_refused_or_flagged(shared_data):
    scan = read_nifti(shared_data / RAW_IXI)
    empty = np.zeros(scan.data.shape, bool)
    with pytest.raises(ScanError, match="no brain at all"):
        find_brain(scan, empty)
    with pytest.raises(ScanError, match="grid"):
        find_brain(scan, empty[:, :, :10])
    # The user's own mask is theirs to choose: a part of the brain or the whole head is scored as
    # asked, with a warning saying what it holds.
    small = empty.copy()
    small[50:60, 50:60, 40:50] = True
    with pytest.warns(ScanWarning, match=r"holds 8 mL, far less than an adult brain"):
        assert find_brain(scan, small).volume_ml == pytest.approx(8.0)
    with pytest.warns(ScanWarning, match="more than any brain"):
        find_brain(scan, np.ones(scan.data.shape, bool))
    # A skull-stripped scan whose "brain" is a small block is refused.
    block = NiftiVolume(np.where(small, 100.0, 0.0).astype(np.float32), scan.geometry)
    with pytest.raises(ScanError, match=r"skull-stripped brain holds 8 mL.*cover the whole brain"):
        find_brain(block)


# --- the size limits, just below and just above each --------------------------------------

# Synthetic brains on 10 mm voxels (1 mL each) unless told otherwise, in a box: three rods through
# the box's centre give the brain the box's extent along each axis, and the box filled from one
# corner gives it the volume asked for; around the box, a margin of background.
MARGIN = 2


def _brain_of(volume_ml: float, box_voxels=(12, 12, 12), spacing=(10.0, 10.0, 10.0)) -> np.ndarray:
    box = np.zeros(box_voxels, dtype=bool)
    x, y, z = (n // 2 for n in box_voxels)
    box[:, y, z] = box[x, :, z] = box[x, y, :] = True
    voxels = round(volume_ml / (np.prod(spacing) / 1000.0))
    rest = np.flatnonzero(~box)
    assert np.count_nonzero(box) <= voxels <= box.size, "the box cannot hold that volume"
    box.flat[rest[: voxels - np.count_nonzero(box)]] = True
    mask = np.zeros(tuple(n + 2 * MARGIN for n in box_voxels), dtype=bool)
    mask[MARGIN:-MARGIN, MARGIN:-MARGIN, MARGIN:-MARGIN] = box
    return mask


def _scan_of(mask: np.ndarray, spacing=(10.0, 10.0, 10.0)) -> NiftiVolume:
    """A skull-stripped scan: the brain on a background of 0, its values (50-150) changing
    smoothly along the first axis, with a little noise, as an image's do."""
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    ramp = np.linspace(50.0, 150.0, mask.shape[0])[:, None, None]
    values = ramp + np.random.default_rng(0).normal(0.0, 1.0, mask.shape)
    data = np.where(mask, values, 0.0).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(mask.shape)
    header.set_zooms(spacing)
    return NiftiVolume(data, NiftiGeometry(source="synthetic head", affine=affine, shape=mask.shape, header=header))


def test_the_synthetic_brains_have_the_volume_and_extent_asked_for():
    mask = _brain_of(590)
    assert np.count_nonzero(mask) == 590
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        assert (present.max() - present.min() + 1) * 10.0 == 120.0


def test_a_brain_just_under_the_smallest_volume_is_refused_and_one_just_over_accepted():
    """The floor is 600 mL: a skull-stripped brain of 590 mL is refused, one of 610 mL is taken;
    a user's own mask of 590 mL is scored with a warning, one of 610 mL without."""
    small, enough = _brain_of(590), _brain_of(610)
    with pytest.raises(ScanError, match=r"skull-stripped brain holds 590 mL, far less than an adult brain"):
        find_brain(_scan_of(small))
    found = find_brain(_scan_of(enough))
    assert found.source == SKULL_STRIPPED and found.volume_ml == pytest.approx(610.0)
    with pytest.warns(ScanWarning, match=r"holds 590 mL, far less than an adult brain"):
        assert find_brain(_scan_of(small), small).volume_ml == pytest.approx(590.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanWarning)
        assert find_brain(_scan_of(enough), enough).source == GIVEN


def test_a_brain_just_shorter_than_the_shortest_extent_is_refused_and_one_just_longer_accepted():
    """A brain must span 90 mm along every axis: on 5 mm slices, one spanning 85 mm from its first
    slice to its last is refused (whatever its volume), one spanning 95 mm is taken."""
    spacing = (10.0, 10.0, 5.0)
    short = _brain_of(800, box_voxels=(12, 12, 17), spacing=spacing)  # 17 slices of 5 mm: 85 mm
    long_enough = _brain_of(800, box_voxels=(12, 12, 19), spacing=spacing)  # 19 slices: 95 mm
    with pytest.raises(ScanError, match=r"spans only 85 mm along one axis \(800 mL\)"):
        find_brain(_scan_of(short, spacing))
    found = find_brain(_scan_of(long_enough, spacing))
    assert found.source == SKULL_STRIPPED and found.volume_ml == pytest.approx(800.0)


def test_a_brain_just_over_the_largest_volume_is_refused_and_one_just_under_accepted():
    """The ceiling is 2500 mL: an extraction of 2510 mL still holds skull and is refused, one of
    2490 mL is taken (as is a skull-stripped scan of 2490 mL); a user's mask of 2510 mL is scored
    with a warning, one of 2490 mL without."""
    box = (17, 17, 17)  # about half filled, as a brain fills its box
    under, over = _brain_of(2490, box), _brain_of(2510, box)
    scan = _scan_of(under)
    for mask, volume in ((under, 2490.0), (over, 2510.0)):
        assert np.count_nonzero(mask) * voxel_ml(scan) == pytest.approx(volume)
    with pytest.raises(ScanError, match=r"brain extraction \(deepbet\) holds 2510 mL, more than any brain"):
        check_brain_size(BrainMask(over, EXTRACTED, 2510.0, "deepbet"), scan)
    check_brain_size(BrainMask(under, EXTRACTED, 2490.0, "deepbet"), scan)  # no complaint
    found = find_brain(scan)
    assert found.source == SKULL_STRIPPED and found.volume_ml == pytest.approx(2490.0)
    with pytest.warns(ScanWarning, match=r"holds 2510 mL, more than any brain"):
        find_brain(scan, over)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanWarning)
        assert find_brain(scan, under).volume_ml == pytest.approx(2490.0)


# --- what is not a head MRI ------------------------------------------------------------------


def _volume(data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> NiftiVolume:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_zooms(spacing)
    return NiftiVolume(data.astype(np.float32), NiftiGeometry(source="not a head", affine=np.diag([*spacing, 1.0]),
                                                             shape=data.shape, header=header))


def test_noise_and_a_cylinder_are_refused_as_no_head_mri_whatever_their_size():
    """A 3D noise volume (2.1 L of "skull-stripped brain") and a cylinder of brain size were
    analysed as brains; they are refused, saying why, before any model runs."""
    rng = np.random.default_rng(0)
    with pytest.raises(ScanError, match=r"does not look like a head MRI.*hardly correlate \(r = 0.0"):
        find_brain(_volume(rng.uniform(1.0, 1000.0, (128, 128, 128))))
    z, y, x = np.indices((80, 100, 100))
    cylinder = ((y - 50) ** 2 + (x - 50) ** 2 <= 33 ** 2) & (z > 5) & (z < 75)
    smooth = np.where(cylinder, 500.0, 0.0) + np.linspace(0.0, 20.0, 80)[:, None, None] * cylinder
    with pytest.raises(ScanError, match=r"fills 7\d % of its bounding box, where a brain fills about half"):
        find_brain(_volume(smooth, (2.0, 2.0, 2.0)))
    # Given as the user's brain mask, the cylinder's shape is theirs to choose; noise still is not an image.
    assert find_brain(_volume(smooth, (2.0, 2.0, 2.0)), cylinder).source == GIVEN
    noisy = np.abs(np.where(cylinder, 500.0, 0.0) + rng.normal(0.0, 150.0, cylinder.shape))
    with pytest.raises(ScanError, match="hardly correlate"):
        find_brain(_volume(noisy, (2.0, 2.0, 2.0)), cylinder)


def test_the_head_checks_limits_sit_between_real_brains_and_what_is_not_one(shared_data):
    """Real brains, thick clinical slices included, pass with room to spare: they fill about half
    their box and their neighbouring voxels correlate far above the floor."""
    for path in ("ms_clinical/104670/FLAIR.nii.gz", "mslub/patient26/FLAIR.nii.gz", RAW_IXI):
        scan = read_nifti(shared_data / path)
        found = find_brain(scan)
        assert 0.4 < box_fill(found.mask) < MOST_BRAIN_FILL - 0.1
        assert neighbour_correlation(scan.data, found.mask) > LEAST_NEIGHBOUR_CORRELATION + 0.2
