"""N4 bias field correction in model space: it removes a known field from a real scan, leaves
z-scored scans alone with a warning, and the reconstruction comes back in the scan's own
(uncorrected) intensities."""

from __future__ import annotations

import numpy as np
import pytest

from napari_brain_uad.bias_field import BiasCorrectionSkipped, n4_bias_field
from napari_brain_uad.nifti import ScanWarning, read_nifti
from napari_brain_uad.preprocess import ModelSpaceSpec, to_model_space

from conftest import NoConfig

N4 = ModelSpaceSpec(bias_correction="n4")


def _smooth_field(shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field like a receive coil's: brighter towards one corner."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.exp(strength * (0.6 * x + 0.3 * y - 0.4 * z + 0.3 * x * y)).astype(np.float32)


@pytest.fixture(scope="module")
def mslub_model_space(shared_data):
    """The MSLUB T1 (already N4-corrected by its publishers) in model space, with its raw
    (unnormalised) intensities."""
    scan = read_nifti(shared_data / "mslub/patient26/T1.nii.gz")
    volume = to_model_space(scan)
    raw = volume.to_scan_intensities(volume.image)
    return volume, raw


def test_n4_recovers_a_known_field_on_a_real_scan(mslub_model_space):
    volume, raw = mslub_model_space
    brain = volume.brain_mask & (raw > 0)
    true_field = _smooth_field(raw.shape, strength=0.35)  # about 0.5x to 2x across the head
    estimated = n4_bias_field(raw * true_field, volume.brain_mask)

    assert estimated.shape == raw.shape and estimated.dtype == np.float32
    assert np.median(estimated[brain]) == pytest.approx(1.0, abs=1e-3)
    assert (estimated[~volume.brain_mask] == 1.0).all()
    # Up to a global scale (N4 cannot know it), the field found is the field put in.
    ratio = estimated[brain] / true_field[brain]
    ratio /= np.median(ratio)
    assert np.mean(np.abs(ratio - 1.0)) < 0.05
    # The corrected scan is the original again: its deviation from it is a fraction of the field's.
    corrected = raw * true_field / estimated
    scale = np.median(corrected[brain] / raw[brain])
    error_after = np.median(np.abs(corrected[brain] / scale - raw[brain]) / raw[brain])
    error_before = np.median(np.abs(raw[brain] * true_field[brain] / np.median(true_field[brain]) - raw[brain])
                             / raw[brain])
    assert error_after < 0.25 * error_before


def test_n4_on_a_corrected_scan_changes_little(mslub_model_space):
    volume, raw = mslub_model_space
    field = n4_bias_field(raw, volume.brain_mask)
    brain = volume.brain_mask
    assert np.percentile(field[brain], 1) > 0.9 and np.percentile(field[brain], 99) < 1.1


def test_bias_corrected_model_space_stays_in_0_1_and_undoes_to_scan_intensities(shared_data):
    subject = "IXI105-HH-1471"
    scan = read_nifti(shared_data / f"ixi_t1/{subject}_T1.nii.gz")
    mask = read_nifti(shared_data / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz")
    plain = to_model_space(scan, brain_mask=mask)
    corrected = to_model_space(scan, brain_mask=mask, spec=N4)

    assert plain.bias_field is None and corrected.bias_field is not None
    assert corrected.image.min() == 0.0 and corrected.image.max() == 1.0
    # This IXI scan is not bias-corrected: its field varies widely across the brain...
    field = corrected.bias_field[corrected.brain_mask]
    assert np.percentile(field, 99) / np.percentile(field, 1) > 1.4
    # ...and removing it sharpens the white-matter peak of the histogram.
    def highest_peak(volume):
        counts, _ = np.histogram(volume.image[volume.brain_mask], bins=100, range=(0.0, 1.0), density=True)
        return counts[1:-1].max()  # leave out the clipped ends
    assert highest_peak(corrected) > 1.3 * highest_peak(plain)
    # Going back puts the field back: both give the scan's own intensities where neither clipped.
    inside = corrected.brain_mask & (corrected.image > 0) & (corrected.image < 1) & (plain.image > 0) & (plain.image < 1)
    np.testing.assert_allclose(corrected.to_scan_intensities(corrected.image)[inside],
                               plain.to_scan_intensities(plain.image)[inside], rtol=1e-4)


def test_z_scored_scan_is_left_alone_with_a_warning(shared_data):
    scan = read_nifti(shared_data / "brats2013/pat0001/FLAIR.nii.gz")
    mask = read_nifti(shared_data / "brats2013/pat0001/brainmask.nii.gz")
    plain = to_model_space(scan, brain_mask=mask)
    with pytest.warns(ScanWarning, match="no bias field correction.*zero or negative"):
        asked = to_model_space(scan, brain_mask=mask, spec=N4)
    assert asked.bias_field is None
    np.testing.assert_array_equal(asked.image, plain.image)


def test_n4_refuses_what_it_cannot_correct():
    with pytest.raises(BiasCorrectionSkipped, match="empty"):
        n4_bias_field(np.ones((8, 8, 8)), np.zeros((8, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="same 3D grid"):
        n4_bias_field(np.ones((8, 8, 8)), np.ones((8, 8, 7), dtype=bool))


def test_spec_records_the_correction_and_old_models_have_none():
    assert ModelSpaceSpec.from_dict(N4.to_dict()) == N4
    old = {"spacing_mm": 2.0, "in_plane": [96, 96], "percentiles": [1.0, 99.0], "modality": "T1"}
    assert ModelSpaceSpec.from_dict(old).bias_correction is None
    with pytest.raises(ValueError, match="unknown bias correction"):
        ModelSpaceSpec(bias_correction="n3")


def test_training_config_passes_the_correction_to_the_model_space(tmp_path):
    from brain_uad_training.config import ConfigError, TrainingConfig

    config = TrainingConfig(data=str(tmp_path), output=str(tmp_path / "run"), bias_correction="n4")
    assert config.model_space_spec().bias_correction == "n4"
    with pytest.raises(ConfigError, match="unknown bias correction"):
        TrainingConfig(data=str(tmp_path), output=str(tmp_path / "run"), bias_correction="yes")
    assert TrainingConfig(data=str(tmp_path), output=str(tmp_path / "run")).model_space_spec().bias_correction is None


def test_reconstruction_comes_back_with_the_scans_own_bias(shared_data):
    """The widget shows the pseudo-healthy reconstruction beside the scan, in the scan's units: a
    model that reconstructs perfectly must give back the scan itself, bias field included."""
    import torch

    from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
    from napari_brain_uad.models import ReconstructionModel

    class Perfect(ReconstructionModel):
        kind = "perfect"
        config_class = NoConfig

        def reconstruct(self, slices, t=None, generator=None):
            return slices.clone()

    subject = "IXI105-HH-1471"
    scan = read_nifti(shared_data / f"ixi_t1/{subject}_T1.nii.gz")
    mask = read_nifti(shared_data / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz")
    result = analyse_scan(scan, Perfect(NoConfig(), spec=N4), brain_mask=mask,
                          settings=AnalysisSettings(scorer="residual", device="cpu"))
    field = result.model_space.bias_field
    brain = result.model_space.brain_mask
    assert np.percentile(field[brain], 99) / np.percentile(field[brain], 1) > 1.4  # a field worth putting back
    # Compare where the normalised scan was not clipped at 0 or 1 (1 % each side).
    transform = result.model_space.transform
    unclipped = (transform.to_native(((result.model_space.image > 0) & (result.model_space.image < 1)
                                      & brain).astype(np.float32)) > 0.999) & result.brain_mask
    relative = np.abs(result.reconstruction[unclipped] - scan.data[unclipped]) / scan.data[unclipped]
    assert np.median(relative) < 0.01
    assert np.percentile(relative, 95) < 0.05
