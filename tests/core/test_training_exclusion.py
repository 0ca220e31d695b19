"""Training on patients' scans: brains found as the plugin finds them, lesions (exclusion masks)
left out of the loss and out of calibration, and thick clinical slices simulated — on the real
elderly FLAIRs with their automatic WMH masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brain_uad_training import ConfigError, TrainingConfig, fit
from brain_uad_training.data import SliceSampler, find_scans, load_model_space, thick_slice
from napari_brain_uad.brain_mask import EXCLUSION_GROWTH_MM, LARGEST_BRAIN_ML, find_brain, grown_mask
from napari_brain_uad.calibration import outside_exclusion
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.models.autoencoders import DAE, reconstruction_error
from napari_brain_uad.postprocess import FilteredMap
from napari_brain_uad.preprocess import ModelSpaceSpec, to_model_space
from napari_brain_uad.thresholds import healthy_percentile_threshold

from conftest import SHARED_DATA

NICHART = SHARED_DATA / "nichart_elderly"
SUBJECTS = ("Subj1", "Subj2", "Subj3")


@pytest.fixture(scope="module")
def flair_list(tmp_path_factory):
    """A training list as a clinic writes one: one folder per subject, the same file names in
    each, skull on, no brain masks, an exclusion mask per scan."""
    if not NICHART.is_dir():
        pytest.skip(f"the elderly FLAIR scans are not in {NICHART} (set NAPARI_BRAIN_UAD_DATA to ../shared/data)")
    table = tmp_path_factory.mktemp("flair") / "list.csv"
    rows = [f"{NICHART / s / 'FLAIR.nii.gz'},,{NICHART / s / 'wmhmask_auto.nii.gz'}" for s in SUBJECTS]
    table.write_text("image,brain_mask,exclude_mask\n" + "\n".join(rows) + "\n")
    return table


@pytest.fixture(scope="module")
def flair_scans(flair_list):
    return load_model_space(find_scans(flair_list), ModelSpaceSpec(modality="FLAIR"))


def test_scans_of_one_name_in_subject_folders_are_named_after_their_folders(flair_list):
    assert [pair.subject for pair in find_scans(flair_list)] == [f"{s}_FLAIR" for s in SUBJECTS]


def test_a_skull_on_scan_trains_on_its_extracted_brain_not_its_head(flair_scans):
    for scan in flair_scans:
        brain_ml = scan.brain_mask.sum() * 8 / 1000
        assert 1000 < brain_ml < LARGEST_BRAIN_ML, f"{scan.subject}: {brain_ml:.0f} mL taken as brain"
        assert not scan.image[~scan.brain_mask].any()  # the skull and scalp are gone


def test_the_exclusion_mask_covers_the_lesions_grown_and_stays_in_the_brain(flair_list, flair_scans):
    pair, scan = find_scans(flair_list)[0], flair_scans[0]
    native = read_nifti(pair.image)
    model_space = to_model_space(native, brain_mask=find_brain(native).mask, spec=ModelSpaceSpec(modality="FLAIR"))
    lesions = model_space.transform.to_model((read_nifti(pair.exclude_mask).data > 0).astype(np.float32),
                                             antialias=False) >= 0.5
    exclude = np.moveaxis(scan.exclude, 0, 2)
    lesions &= model_space.brain_mask
    assert lesions.any() and exclude[lesions].all()  # every lesion voxel is left out
    assert exclude.sum() > 1.5 * lesions.sum()  # and a rim around them
    assert not (exclude & ~model_space.brain_mask).any()


def test_excluded_voxels_give_the_loss_no_gradient():
    torch.manual_seed(0)
    predicted = torch.rand(2, 1, 8, 8, requires_grad=True)
    target = torch.rand(2, 1, 8, 8)
    excluded = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    excluded[:, :, 2:5, 3:6] = True
    loss = reconstruction_error(predicted, target, "l2", excluded)
    loss.backward()
    assert torch.all(predicted.grad[excluded] == 0) and torch.all(predicted.grad[~excluded] != 0)
    by_hand = ((predicted - target)[~excluded] ** 2).mean()
    assert torch.isclose(loss, by_hand)
    # A wrong target inside the excluded voxels changes nothing.
    worse = target.clone()
    worse[excluded] = 5.0
    assert torch.isclose(reconstruction_error(predicted, worse, "l2", excluded), loss)


def test_a_dae_trains_with_exclusions_and_a_kind_that_cannot_exclude_refuses(tmp_path, flair_list, flair_scans,
                                                                              monkeypatch):
    values = dict(data=str(flair_list), output=str(tmp_path / "dae"), kind="dae", modality="FLAIR",
                  model={"channels": [16, 32, 32, 64], "num_res_units": 1}, steps=3, batch_size=4,
                  validation_slices=8, validate_every=3, thick_slice_probability=0.5)
    losses, received = [], []
    original = DAE.training_loss

    def spy(model, slices, brain_mask=None, generator=None, excluded=None):
        if model.training:
            received.append(excluded)
        return original(model, slices, brain_mask, generator, excluded)

    monkeypatch.setattr(DAE, "training_loss", spy)
    result = fit(TrainingConfig(**values), show_progress=False, scans=(flair_scans[:2], flair_scans[2:]),
                 on_step=lambda step, loss: losses.append(loss))
    assert result.steps_done == 3 and all(np.isfinite(losses))
    # Each step's loss was told exactly the excluded voxels of that step's slices.
    sampler = SliceSampler(flair_scans[:2], seed=0, thick_slices=(0.5, 4))
    for step, excluded in enumerate(received):
        expected = sampler.training_batch(step, 0, 4)[2]
        assert excluded is not None and torch.equal(excluded.cpu(), expected) and expected.any()
    with pytest.raises(ConfigError, match="cannot leave voxels out"):
        fit(TrainingConfig(**{**values, "kind": "ddpm", "output": str(tmp_path / "ddpm"),
                              "model": {"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16}}),
            show_progress=False, scans=(flair_scans[:2], flair_scans[2:]))


def test_thick_slices_are_the_mean_of_their_neighbours_and_off_by_default(flair_scans):
    stack = flair_scans[0].image
    assert np.array_equal(thick_slice(stack, 30, 1), stack[30])
    assert np.allclose(thick_slice(stack, 30, 3), (stack[29] + stack[30] + stack[31]) / 3)
    assert np.allclose(thick_slice(stack, 30, 4), (stack[29] + stack[30] + stack[31] + stack[32]) / 4)
    assert np.allclose(thick_slice(stack, 0, 3), (2 * stack[0] + stack[1]) / 3)  # the edge repeated
    plain = SliceSampler(flair_scans, seed=0)
    thick = SliceSampler(flair_scans, seed=0, thick_slices=(1.0, 4))
    chosen = plain.draw(0, 0, 8)
    assert (plain.widths(0, 0, 8) == 1).all()
    widths = thick.widths(0, 0, 8)
    assert ((widths >= 2) & (widths <= 4)).all()
    images, masks = thick.gather(chosen, widths)
    for (scan, z), width, image, mask in zip(chosen, widths, images, masks):
        expected = thick_slice(flair_scans[scan].image, z, width) * flair_scans[scan].brain_mask[z]
        assert np.allclose(image[0].numpy(), expected)
    # The excluded voxels of a 3-slice-thick slice are those of the slice and both neighbours.
    scan = next(index for index, s in enumerate(flair_scans) if s.exclude.any())
    z = int(np.argmax(flair_scans[scan].exclude.sum(axis=(1, 2))))
    excluded = thick.excluded(np.array([[scan, z]]), np.array([3]))
    by_hand = flair_scans[scan].exclude[z - 1] | flair_scans[scan].exclude[z] | flair_scans[scan].exclude[z + 1]
    assert np.array_equal(excluded[0, 0].numpy(), by_hand)


def test_masks_grow_by_millimetres_on_anisotropic_grids():
    mask = np.zeros((21, 21, 5), dtype=bool)
    mask[10, 10, 2] = True
    grown = grown_mask(mask, (1.0, 1.0, 8.0), EXCLUSION_GROWTH_MM)
    assert grown[10, 6:15, 2].all() and not grown[10, 5, 2] and not grown[10, 15, 2]  # 4 voxels of 1 mm
    assert not grown[10, 10, 1] and not grown[10, 10, 3]  # the next slice is 8 mm away


def test_calibration_leaves_the_excluded_lesions_out_of_the_healthy_threshold():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (40, 40, 20)).astype(np.float32)
    brain = np.zeros(values.shape, dtype=bool)
    brain[2:38, 2:38, 2:18] = True
    lesion = np.zeros(values.shape, dtype=bool)
    lesion[15:25, 15:25, 8:12] = True
    values[lesion] = 5.0  # lesions score far above healthy tissue
    values[~brain] = 0
    filtered = FilteredMap(values, brain, brain, (2.0, 2.0, 2.0))
    with_lesions, _ = healthy_percentile_threshold([filtered])
    without, _ = healthy_percentile_threshold([outside_exclusion(filtered, lesion)])
    assert with_lesions == 5.0  # the 99th percentile falls in the lesions when they are counted
    assert without < 1.0
    kept = outside_exclusion(filtered, lesion).region
    assert not kept[grown_mask(lesion, 2.0)].any() and kept.sum() < brain.sum() - lesion.sum()


def test_exclusions_are_refused_before_any_scan_is_read_where_they_would_not_be_honoured(tmp_path, flair_list):
    common = dict(data=str(flair_list), output=str(tmp_path / "run"), modality="FLAIR", steps=1)
    with pytest.raises(ConfigError, match="cannot leave voxels out"):
        fit(TrainingConfig(kind="ddpm", **common), show_progress=False)
    with pytest.raises(ConfigError, match="pre-training"):
        fit(TrainingConfig(kind="dae", pretrain="denoise-decoder", pretrain_steps=1, **common), show_progress=False)
    with pytest.raises(ConfigError, match="thickest_slice"):
        TrainingConfig(kind="dae", thick_slice_probability=0.3, thickest_slice=1, **common)
