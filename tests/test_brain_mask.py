"""Where the brain is: the user's mask, a skull-stripped scan's own brain, or an extraction —
and never a mask that is not brain-sized."""

from __future__ import annotations

import numpy as np
import pytest

from napari_brain_uad.brain_mask import EXTRACTED, GIVEN, SKULL_STRIPPED, find_brain
from napari_brain_uad.io import NiftiGeometry, NiftiVolume, ScanError, ScanWarning, read_nifti

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
