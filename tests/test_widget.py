"""The dock widget in a real napari window (needs a display: run under Xvfb)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad._widget import BrainUADWidget


@pytest.fixture
def viewer_with_widget(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    return viewer, widget


def test_command_opens_our_widget(viewer_with_widget):
    _, widget = viewer_with_widget
    assert isinstance(widget, BrainUADWidget)
    assert "Open a NIfTI scan" in widget.scan_info.value


def test_sample_mask_edit_export_reload(viewer_with_widget, shared_data, tmp_path):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    assert "T1.nii.gz" in widget.scan_info.value and "LAS" in widget.scan_info.value
    assert "182 × 218 × 182" in widget.scan_info.value

    # A user's edit of the lesion mask: erase one lesion voxel, paint a new one.
    lesions = viewer.layers["MSLUB lesion mask"]
    edited = lesions.data.copy()
    first = tuple(np.argwhere(edited > 0)[0])
    edited[first] = 0
    edited[10, 20, 30] = 1
    lesions.data = edited
    widget.mask.value = lesions

    out = widget.export_mask(tmp_path / "edited.nii.gz")
    saved = nib.load(out)
    original = nib.load(shared_data / "mslub/patient26/lesionmask.nii.gz")
    np.testing.assert_array_equal(saved.affine, original.affine)
    geometry = lesions.metadata["nifti"]
    np.testing.assert_array_equal(np.asarray(saved.dataobj), geometry.to_source(edited))
    changed = np.argwhere(np.asarray(saved.dataobj) != np.asarray(original.dataobj))
    assert len(changed) == 2  # exactly the two edited voxels, nothing else moved

    # Reload through our reader: the same voxels in the viewer.
    (reloaded,) = viewer.open(str(out), plugin="napari-brain-uad")
    np.testing.assert_array_equal(reloaded.data, edited)

    with pytest.raises(FileExistsError):
        widget.export_mask(out)


def test_overlay_is_drawn(make_napari_viewer, shared_data):
    viewer = make_napari_viewer(show=True)  # the canvas renders only in a shown window
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    viewer.dims.set_point(0, viewer.layers["MSLUB lesion mask"].translate[0] + 90)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 100
    grey = shot[..., :3].std()
    assert grey > 10  # not a blank canvas
    # Label colours are not grey: the lesion overlay shows.
    saturation = shot[..., :3].max(axis=-1).astype(int) - shot[..., :3].min(axis=-1)
    assert (saturation > 60).sum() > 20


def test_export_without_geometry_says_why(viewer_with_widget, tmp_path):
    viewer, widget = viewer_with_widget
    viewer.add_labels(np.zeros((5, 6, 7), dtype=np.uint8), name="drawn")
    widget.mask.value = viewer.layers["drawn"]
    with pytest.raises(Exception, match="no NIfTI geometry"):
        widget.export_mask(tmp_path / "drawn.nii.gz")
    assert not (tmp_path / "drawn.nii.gz").exists()
