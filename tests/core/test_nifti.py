"""Exact geometry: NIfTI in, display copy, masks back on the source grid with the source affine."""

from __future__ import annotations

import gzip
import warnings

import napari
import nibabel as nib
import numpy as np
import pytest
from napari.components import ViewerModel

from conftest import GEOMETRIES
from napari_brain_uad.nifti import ScanError, ScanWarning, read_nifti, save_on_source_grid

PLUGIN = "napari-brain-uad"


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_threshold_exported_through_napari_matches_threshold_of_file(shared_data, tmp_path, geometry):
    """Open with napari, threshold, save the Labels layer: the file equals the threshold of the
    original voxels, on the original grid with the original affine."""
    path = shared_data / GEOMETRIES[geometry][0]
    viewer = ViewerModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        (image,) = viewer.open(str(path), plugin=PLUGIN)
    assert isinstance(image, napari.layers.Image)
    threshold = float(np.percentile(image.data[image.data > 0], 60))
    labels = napari.layers.Labels(
        (image.data > threshold).astype(np.uint8),
        scale=image.scale, translate=image.translate, metadata=image.metadata, name="lesions",
    )
    out = tmp_path / f"{geometry}_mask.nii.gz"
    written = napari.save_layers(str(out), [labels], plugin=PLUGIN)
    assert written == [str(out)]

    original, saved = nib.load(path), nib.load(out)
    assert saved.shape == original.shape
    np.testing.assert_array_equal(saved.affine, original.affine)
    expected = np.nan_to_num(original.get_fdata()) > threshold
    np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0, expected)
    assert saved.header.get_sform(coded=True)[1] == original.header.get_sform(coded=True)[1]
    assert saved.header.get_qform(coded=True)[1] == original.header.get_qform(coded=True)[1]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_display_is_upright_with_voxel_spacing(shared_data, geometry):
    """Whatever the stored orientation, display axes run inferior, posterior, left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        volume = read_nifti(shared_data / GEOMETRIES[geometry][0])
    geometry_ = volume.geometry
    directions = geometry_.display_affine[:3, :3] / np.asarray(geometry_.display_scale)
    # I = -z, P = -y, L = -x in scanner RAS coordinates: each display axis points mostly that way.
    assert directions[2, 0] < -0.9 and directions[1, 1] < -0.9 and directions[0, 2] < -0.9
    assert np.allclose(sorted(geometry_.display_scale), sorted(geometry_.spacing))
    assert volume.display_data().shape == geometry_.display_shape


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_source_voxel_is_found_at_its_display_position(shared_data, geometry):
    """Clicking a finding (a source voxel) must take the viewer to that voxel on screen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        geometry_ = read_nifti(shared_data / GEOMETRIES[geometry][0]).geometry
    index = (3, 7, 11)
    marked = np.zeros(geometry_.shape, dtype=np.uint8)
    marked[index] = 1
    display_index = np.argwhere(geometry_.to_display(marked))[0]
    expected = display_index * np.asarray(geometry_.display_scale) + np.asarray(geometry_.display_translate)
    np.testing.assert_allclose(geometry_.source_index_to_world(index), expected, atol=1e-6)


def test_grids_of_one_subject_overlay_in_world_coordinates(shared_data, tmp_path):
    """Scan and brain mask of another resolution sit on each other in napari's world. A mask is
    written by hand on a grid of twice the scan's voxel size with its first axis stored in reverse;
    one of its voxels and the 2×2×2 scan voxels it covers are marked. Opened in napari, both marks
    lie at the one physical point, in world coordinates (inferior, posterior, left) = −(z, y, x) of
    the point's scanner position, which is computed here from the scan's affine alone."""
    scan_path = shared_data / GEOMETRIES["ixi-psr-2mm"][0]  # stored P, S, R: napari's axes are permuted
    scan = nib.load(scan_path)
    coarse_shape = np.array(scan.shape) // 2
    # Coarse voxel (a, b, c) covers the scan's voxels 2a'…2a'+1, 2b…2b+1, 2c…2c+1 with a' = n - 1 - a
    # (the first axis reversed): its centre is the scan's fractional index (2a' + 0.5, 2b + 0.5, 2c + 0.5).
    coarse_to_scan_index = np.array([[-2.0, 0.0, 0.0, 2.0 * (coarse_shape[0] - 1) + 0.5],
                                     [0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    a, b, c = 17, 25, 30
    reversed_a = coarse_shape[0] - 1 - a
    coarse = np.zeros(coarse_shape, dtype=np.uint8)
    coarse[a, b, c] = 1
    fine = np.zeros(scan.shape, dtype=np.uint8)
    fine[2 * reversed_a:2 * reversed_a + 2, 2 * b:2 * b + 2, 2 * c:2 * c + 2] = 1
    paths = {}
    for name, mask, affine in (("coarse", coarse, scan.affine @ coarse_to_scan_index), ("fine", fine, scan.affine)):
        image = nib.Nifti1Image(mask, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        paths[name] = tmp_path / f"{name}_mask.nii.gz"
        nib.save(image, paths[name])
    x, y, z, _ = scan.affine @ np.array([2 * reversed_a + 0.5, 2 * b + 0.5, 2 * c + 0.5, 1.0])
    expected_world = [-z, -y, -x]

    viewer = ViewerModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        (scan_layer,) = viewer.open(str(scan_path), plugin=PLUGIN)
        (coarse_layer,) = viewer.open(str(paths["coarse"]), plugin=PLUGIN)
        (fine_layer,) = viewer.open(str(paths["fine"]), plugin=PLUGIN)
    assert coarse_layer.data.shape != fine_layer.data.shape
    (coarse_voxel,) = np.argwhere(coarse_layer.data)
    np.testing.assert_allclose(coarse_layer.data_to_world(coarse_voxel), expected_world, atol=1e-3)
    fine_voxels = np.argwhere(fine_layer.data)
    assert len(fine_voxels) == 8
    fine_world = np.mean([fine_layer.data_to_world(voxel) for voxel in fine_voxels], axis=0)
    np.testing.assert_allclose(fine_world, expected_world, atol=1e-3)
    # The mask on the scan's grid is placed exactly where the scan is.
    np.testing.assert_allclose(fine_layer.scale, scan_layer.scale)
    np.testing.assert_allclose(fine_layer.translate, scan_layer.translate)


def test_reader_opens_masks_as_labels(shared_data):
    viewer = ViewerModel()
    viewer.open(str(shared_data / "mslub/patient26/lesionmask.nii.gz"), plugin=PLUGIN)
    viewer.open(str(shared_data / "brats2013/pat0001/tumourmask.nii.gz"), plugin=PLUGIN)
    viewer.open(str(shared_data / "brats2013/pat0001/brainmask.nii.gz"), plugin=PLUGIN)
    lesion, tumour, brain = viewer.layers
    assert all(isinstance(layer, napari.layers.Labels) for layer in viewer.layers)
    assert set(np.unique(tumour.data)) == {0, 1, 2, 3, 4}
    assert set(np.unique(brain.data)) == {0, 1}  # stored as 0.99999997 with a scale factor
    assert lesion.data.sum() == np.asarray(nib.load(shared_data / "mslub/patient26/lesionmask.nii.gz").dataobj).sum()


def test_image_writer_round_trips_intensities(shared_data, tmp_path):
    viewer = ViewerModel()
    (image,) = viewer.open(str(shared_data / "brats2013/pat0001/FLAIR.nii.gz"), plugin=PLUGIN)
    out = tmp_path / "flair_copy.nii"
    napari.save_layers(str(out), [image], plugin=PLUGIN)
    original = nib.load(shared_data / "brats2013/pat0001/FLAIR.nii.gz")
    np.testing.assert_array_equal(nib.load(out).get_fdata(), original.get_fdata())
    np.testing.assert_array_equal(nib.load(out).affine, original.affine)


def test_labels_drawn_from_scratch_are_refused_with_a_clear_message(tmp_path):
    labels = napari.layers.Labels(np.zeros((10, 20, 30), dtype=np.uint8), name="drawn")
    out = tmp_path / "drawn.nii.gz"
    with pytest.raises(Exception, match="no NIfTI geometry"):
        napari.save_layers(str(out), [labels], plugin=PLUGIN)
    assert not out.exists()


def test_labels_of_another_shape_are_refused(shared_data, tmp_path):
    volume = read_nifti(shared_data / "mslub/patient26/T1.nii.gz")
    labels = napari.layers.Labels(np.zeros((10, 20, 30), dtype=np.uint8), metadata={"nifti": volume.geometry})
    out = tmp_path / "wrong.nii.gz"
    with pytest.raises(Exception, match="cannot be written on that grid"):
        napari.save_layers(str(out), [labels], plugin=PLUGIN)
    assert not out.exists()


def test_core_export_never_overwrites_silently(shared_data, tmp_path):
    volume = read_nifti(shared_data / "mslub/patient26/lesionmask.nii.gz")
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError):
        save_on_source_grid(volume.display_data(), volume.geometry, out)
    assert out.read_bytes() == b"the user's file"
    save_on_source_grid(volume.display_data(), volume.geometry, out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), volume.data)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]  # no temporary left behind


# --- bad input: a clear error naming the file and the problem, or a warning and a sound result


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ScanError, match=r"nowhere\.nii\.gz: file not found"):
        read_nifti(tmp_path / "nowhere.nii.gz")


def test_truncated_gzip(shared_data, tmp_path):
    whole = (shared_data / "mslub/patient26/T1.nii.gz").read_bytes()
    broken = tmp_path / "truncated.nii.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ScanError, match=r"truncated\.nii\.gz: .*truncated or corrupt"):
        read_nifti(broken)


@pytest.mark.parametrize("content", [b"just some text, not an image\n" * 40, gzip.compress(b"\x00" * 400)])
def test_not_a_nifti(tmp_path, content):
    fake = tmp_path / "notes.nii.gz"
    fake.write_bytes(content)
    with pytest.raises(ScanError, match=r"notes\.nii\.gz: .*NIfTI"):
        read_nifti(fake)


def test_not_a_nifti_through_napari_gives_an_error_not_a_layer(tmp_path):
    fake = tmp_path / "notes.nii"
    fake.write_bytes(b"hello" * 100)
    viewer = ViewerModel()
    with pytest.raises(Exception, match="notes.nii"):
        viewer.open(str(fake), plugin=PLUGIN)
    assert len(viewer.layers) == 0


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1)])
def test_2d_image(tmp_path, shape):
    path = _write(tmp_path / "slice.nii.gz", np.ones(shape, dtype=np.float32))
    with pytest.raises(ScanError, match=r"slice\.nii\.gz: is a 2D image"):
        read_nifti(path)


def test_4d_image_uses_the_first_volume_with_a_warning(tmp_path):
    data = np.random.default_rng(0).random((20, 22, 24, 3)).astype(np.float32) + 1
    path = _write(tmp_path / "series.nii.gz", data)
    with pytest.warns(ScanWarning, match=r"series\.nii\.gz: is a 4D image with 3 volumes; using the first"):
        volume = read_nifti(path)
    np.testing.assert_array_equal(volume.data, data[..., 0])
    out = save_on_source_grid(volume.display_data() > 1.5, volume.geometry, tmp_path / "mask.nii.gz")
    assert nib.load(out).shape == (20, 22, 24)


def test_nan_and_inf_are_background_with_a_warning(tmp_path):
    data = np.ones((20, 22, 24), dtype=np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    path = _write(tmp_path / "holes.nii.gz", data)
    with pytest.warns(ScanWarning, match=r"holes\.nii\.gz: 3 voxels are NaN or infinite"):
        volume = read_nifti(path)
    assert np.isfinite(volume.data).all()
    assert (volume.data[0, 0, :3] == 0).all() and volume.data.sum() == data.size - 3


def test_all_zero_volume(tmp_path):
    path = _write(tmp_path / "empty.nii.gz", np.zeros((20, 22, 24), dtype=np.int16))
    with pytest.raises(ScanError, match=r"empty\.nii\.gz: every voxel is zero"):
        read_nifti(path)


def test_sheared_affine_is_shown_axis_aligned_and_exported_exactly(tmp_path):
    affine = np.array([[1.0, 0.3, 0.0, -10], [0.0, 1.0, 0.0, -20], [0.0, 0.0, 2.0, -30], [0, 0, 0, 1]])
    data = np.random.default_rng(1).random((20, 22, 24)).astype(np.float32)
    path = _write(tmp_path / "sheared.nii.gz", data, affine)
    with pytest.warns(ScanWarning, match=r"sheared\.nii\.gz: the affine is oblique or sheared"):
        (image,) = ViewerModel().open(str(path), plugin=PLUGIN)
    labels = napari.layers.Labels((image.data > 0.5).astype(np.uint8), metadata=image.metadata,
                                  scale=image.scale, translate=image.translate)
    out = tmp_path / "sheared_mask.nii.gz"
    napari.save_layers(str(out), [labels], plugin=PLUGIN)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj) > 0, data > 0.5)


def test_a_tiny_file_declaring_a_huge_volume_is_refused_before_reading(tmp_path):
    """146 bytes of gzip declaring 1200 × 1200 × 1100 float32 voxels reached 6.5 GB of memory."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1100))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), 1)
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)  # the header and its extension flag, no voxels
    assert path.stat().st_size < 1000
    with pytest.raises(ScanError, match=r"declares 1200 × 1200 × 1100 voxels .*not read"):
        read_nifti(path)


@pytest.mark.parametrize("srow_z, problem", [([0, 0, np.nan, 0], "NaN or infinite"),
                                             ([0, 0, 0, 0], "gives voxels no volume")])
def test_an_affine_that_places_no_voxel_is_refused_on_reading(tmp_path, srow_z, problem):
    """A header whose voxel-to-world matrix holds NaN, or collapses an axis, was read and then
    failed deep in the analysis as an "internal error"; it is the file's fault and is said so."""
    data = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    header = nib.Nifti1Image(data, np.eye(4)).header
    header["qform_code"], header["sform_code"], header["srow_z"] = 0, 1, srow_z
    path = tmp_path / "bad_header.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header), path)
    assert not np.all(np.isfinite(nib.load(path).affine)) or np.linalg.norm(nib.load(path).affine[:3, 2]) == 0
    with pytest.raises(ScanError, match=rf"bad_header\.nii\.gz: its header's affine .*{problem}.*fix the header"):
        read_nifti(path)
