"""SADM: Perlin noise and DRAEM-style synthetic anomalies, the Siamese U-Net's feature
concatenation, the frozen base model, training on real slices, and a real scan analysed with
its segmentation map (which a saved session keeps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import HALF_SPEC, SMALL_UNET, half_resolution, seeded, train_and_evaluate

from napari_brain_uad.models import DAE, SADM, SADMConfig, build_model, load_model, save_model
from napari_brain_uad.models.sadm import (
    TEXTURE_AUGMENTATIONS,
    SiameseUNet,
    blend_anomaly,
    perlin_noise_2d,
    synthetic_anomalies,
)

SMALL = {"channels": [8, 16, 32], "norm_num_groups": 4}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def small_sadm(spec=HALF_SPEC, **changes) -> SADM:
    return build_model("sadm", {**SMALL, "base_kind": "dae", "base_hyperparameters": SMALL_UNET, **changes}, spec)


# --- synthetic anomalies -------------------------------------------------------------------


def test_perlin_noise_is_zero_on_the_lattice_bounded_and_seeded():
    noise = perlin_noise_2d((64, 64), (4, 8), seeded(3))
    assert noise.shape == (64, 64)
    # Lattice points fall on pixels every 64/4 rows and 64/8 columns: the noise is 0 there.
    np.testing.assert_allclose(noise[::16, ::8].numpy(), 0.0, atol=1e-6)
    assert noise.abs().max() <= 1.0 and noise.abs().max() > 0.2
    torch.testing.assert_close(noise, perlin_noise_2d((64, 64), (4, 8), seeded(3)))
    assert not torch.equal(noise, perlin_noise_2d((64, 64), (4, 8), seeded(4)))


def test_perlin_noise_with_one_cell_matches_a_hand_computation():
    generator = seeded(0)
    angles = torch.rand((2, 2), generator=seeded(0)) * 2 * math.pi
    noise = perlin_noise_2d((4, 4), (1, 1), generator)
    # The pixel (2, 1): offsets fy = 0.5, fx = 0.25 inside the single cell.
    fy, fx = 0.5, 0.25
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    g = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    dots = {(dy, dx): float(g[dy, dx, 0] * (fy - dy) + g[dy, dx, 1] * (fx - dx)) for dy in (0, 1) for dx in (0, 1)}
    top = dots[0, 0] * (1 - fade(fx)) + dots[0, 1] * fade(fx)
    bottom = dots[1, 0] * (1 - fade(fx)) + dots[1, 1] * fade(fx)
    expected = math.sqrt(2) * (top * (1 - fade(fy)) + bottom * fade(fy))
    assert float(noise[2, 1]) == pytest.approx(expected, abs=1e-6)


def test_blend_matches_the_draem_formula_by_hand():
    image = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    texture = torch.tensor([[1.0, 0.0], [0.5, 0.1]])
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    blended = blend_anomaly(image, texture, mask, 0.25)
    # Inside: (1 - 0.25) * I + 0.25 * I_aug; outside: I.
    expected = torch.tensor([[0.75 * 0.2 + 0.25 * 1.0, 0.4], [0.75 * 0.6 + 0.25 * 0.5, 0.75 * 0.8 + 0.25 * 0.1]])
    torch.testing.assert_close(blended, expected)


def test_texture_augmentations_stay_in_range_and_change_the_slice(ixi_training_slices):
    image = ixi_training_slices[0][0, 0]
    for name, augment in TEXTURE_AUGMENTATIONS.items():
        out = augment(image, seeded(1))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1, name
        assert not torch.equal(out, image), name


def test_synthetic_anomalies_change_only_the_brain_inside_their_mask(ixi_training_slices):
    slices, brain = ixi_training_slices
    config = SADMConfig(anomaly_probability=1.0)
    anomalous, masks = synthetic_anomalies(slices, brain, config, seeded(5))
    assert masks.shape == slices.shape and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert not (masks.bool() & ~brain).any()  # anomalies lie in the brain
    torch.testing.assert_close(anomalous[masks == 0], slices[masks == 0])  # nothing changes outside them
    assert (anomalous[masks == 1] != slices[masks == 1]).float().mean() > 0.5
    shares = masks.flatten(1).sum(1) / brain.flatten(1).sum(1)
    assert (shares > 0).sum() >= len(slices) // 2 and shares.max() < 0.6
    # The same seed gives the same anomalies; probability 0 gives none.
    again, again_masks = synthetic_anomalies(slices, brain, config, seeded(5))
    torch.testing.assert_close(again, anomalous)
    torch.testing.assert_close(again_masks, masks)
    clean, empty = synthetic_anomalies(slices, brain, SADMConfig(anomaly_probability=0.0), seeded(5))
    assert torch.equal(clean, slices) and not empty.any()


def test_the_anomalys_texture_comes_from_the_perlin_field_not_the_slice(ixi_training_slices):
    """Thesis appendix C: the augmentations act on the noise, so at full opacity what fills an
    anomaly is the same whatever anatomy lies under it, and a flat slice still gets texture."""
    slices, brain = ixi_training_slices
    config = SADMConfig(anomaly_probability=1.0, opacity=(1.0, 1.0), perlin_scale_exponents=(1, 2))
    anatomy, masks = synthetic_anomalies(slices, brain, config, seeded(7))
    flat = torch.full_like(slices, 0.4)
    on_flat, flat_masks = synthetic_anomalies(flat, brain, config, seeded(7))
    assert torch.equal(masks, flat_masks) and masks.sum() > 0
    inside = masks.bool()
    torch.testing.assert_close(anatomy[inside], on_flat[inside])  # the same texture on either slice
    # On the flat slice the anomalies are textured: most differ from the slice and vary inside.
    textured = [on_flat[index][masks[index].bool()].std() > 0.01
                for index in range(len(slices)) if masks[index].sum() > 20]
    assert len(textured) >= 4 and sum(textured) >= 0.75 * len(textured)


def test_real_lesions_marked_in_a_patients_slice_count_for_nothing_in_the_loss(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    model = small_sadm()
    slices, brain = slices[:4], brain[:4]
    excluded = torch.zeros_like(brain)
    excluded[:, :, 10:30, 10:30] = True
    whole = model.training_loss(slices, brain, seeded(3))
    assert torch.isclose(model.training_loss(slices, brain, seeded(3), excluded=torch.zeros_like(brain)), whole)
    left_out = model.training_loss(slices, brain, seeded(3), excluded=excluded)
    # By hand: the per-pixel BCE of the same draw, averaged over the pixels kept.
    anomalous, masks = synthetic_anomalies(slices, brain, model.config, seeded(3))
    assert not torch.isclose(left_out, whole)
    generator = seeded(3)
    synthetic_anomalies(slices, brain, model.config, generator)
    level = model._levels(None)[int(torch.randint(0, 1, (1,), generator=generator))]
    logits = model.segmentation_logits(anomalous, model.base.reconstruct(anomalous, level, generator))
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    torch.testing.assert_close(left_out, per_pixel[~excluded].mean(), rtol=1e-5, atol=1e-6)
    assert SADM.excludes_voxels


def test_about_half_the_slices_get_an_anomaly_by_default(ixi_training_slices):
    slices, brain = ixi_training_slices
    _, masks = synthetic_anomalies(slices.repeat(4, 1, 1, 1), brain.repeat(4, 1, 1, 1), SADMConfig(), seeded(2))
    with_anomaly = (masks.flatten(1).sum(1) > 0).float().mean()
    assert 0.25 < with_anomaly < 0.75


# --- the Siamese U-Net ---------------------------------------------------------------------


def test_siamese_features_are_each_inputs_features_concatenated_at_every_level():
    network = SiameseUNet([8, 16, 32], groups=4)
    residual, image = torch.randn(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    joint = network.joint_features(residual, image)
    alone_residual, alone_image = network.encode(residual), network.encode(image)
    for level, (width, size) in enumerate(zip([8, 16, 32], [32, 16, 8])):
        assert joint[level].shape == (2, 2 * width, size, size)  # the channels double
        torch.testing.assert_close(joint[level][:, :width], alone_residual[level])
        torch.testing.assert_close(joint[level][:, width:], alone_image[level])
    assert network(residual, image).shape == (2, 1, 32, 32)
    # One encoder: the same weights read both inputs. Its weights are those of a single encoder for one
    # 1-channel image, counted by hand (per level two 3×3 convolutions with biases and two group
    # norms), whether the network reads one image or two; every other weight is the decoder's.
    def block_weights(in_channels, out_channels):
        return (9 * in_channels + 1) * out_channels + (9 * out_channels + 1) * out_channels + 2 * 2 * out_channels

    one_encoder = block_weights(1, 8) + block_weights(8, 16) + block_weights(16, 32)
    assert sum(p.numel() for p in network.encoder_parameters()) == one_encoder
    assert sum(p.numel() for p in SiameseUNet([8, 16, 32], groups=4, inputs=1).encoder_parameters()) == one_encoder
    encoder_weights = {id(p) for p in network.encoder_parameters()}
    decoder_weights = {id(p) for p in network.decoder_parameters()}
    assert not encoder_weights & decoder_weights
    assert encoder_weights | decoder_weights == {id(p) for p in network.parameters()}
    # Changing one encoder weight changes the features of both inputs.
    with torch.no_grad():
        network.encoder[0][0].weight[0, 0, 1, 1] += 1.0
    changed = network.joint_features(residual, image)
    assert not torch.equal(changed[0][:, 0], joint[0][:, 0])  # the residual's first feature
    assert not torch.equal(changed[0][:, 8], joint[0][:, 8])  # the image's first feature
    with pytest.raises(ValueError, match="reads 2 images"):
        network(image)


# --- the model -----------------------------------------------------------------------------


def test_the_base_model_is_frozen_and_only_the_segmenter_trains(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = small_sadm()
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    segmenter_before = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
    before, after = train_and_evaluate(model, slices, brain, steps=25)
    for key, value in model.base.state_dict().items():
        assert torch.equal(value, base_before[key]), key
    assert any(not torch.equal(v, segmenter_before[k]) for k, v in model.segmenter.state_dict().items())
    assert not model.base.training  # train() keeps the frozen base in inference mode
    # It learns to find the synthetic anomalies: the segmentation loss falls.
    assert math.isfinite(after) and after < 0.8 * before


def test_reconstruction_and_segmentation_average_over_the_noise_levels(ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    base = {"timesteps": 1000, "channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16}
    torch.manual_seed(0)
    model = build_model("sadm", {**SMALL, "base_kind": "ddpm", "base_hyperparameters": base}, HALF_SPEC).eval()
    assert model.uses_noise_level and model.samples_differ
    levels = []
    original = model.base.reconstruct
    model.base.reconstruct = lambda x, t, g: levels.append(t) or original(x, t, g)
    batch = slices[:2]
    reconstruction, maps = model.reconstruct_with_maps(batch, None, seeded(0))
    assert levels == [250, 500, 750]  # the thesis's ensemble by default
    segmentation = maps["segmentation"]
    assert reconstruction.shape == segmentation.shape == batch.shape
    assert segmentation.min() >= 0 and segmentation.max() <= 1
    # By hand: the mean over the three levels, with the same noise draws.
    generator = seeded(0)
    by_hand = [original(batch, t, generator) for t in (250, 500, 750)]
    torch.testing.assert_close(reconstruction, torch.stack(by_hand).mean(0))
    expected = torch.stack([torch.sigmoid(model.segmenter(batch - r, batch)) for r in by_hand]).mean(0)
    torch.testing.assert_close(segmentation, expected)


def test_an_autoencoder_base_reconstructs_once(ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    model = small_sadm().eval()
    assert not model.uses_noise_level and not model.samples_differ
    reconstruction, maps = model.reconstruct_with_maps(slices[:2], [250, 500, 750], seeded(0))
    torch.testing.assert_close(reconstruction, model.base.reconstruct(slices[:2]))


def test_checkpoint_round_trip_keeps_both_stages(tmp_path, ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    torch.manual_seed(1)
    model = small_sadm().eval()
    path = save_model(tmp_path / "sadm.safetensors", model)
    loaded, metadata = load_model(path)
    assert metadata["kind"] == "sadm" and metadata["hyperparameters"]["base_kind"] == "dae"
    first, first_maps = model.reconstruct_with_maps(slices[:3])
    second, second_maps = loaded.reconstruct_with_maps(slices[:3])
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first_maps["segmentation"], second_maps["segmentation"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="groups"):
        SADMConfig(channels=(10, 20), norm_num_groups=8)
    with pytest.raises(ValueError, match="another SADM"):
        build_model("sadm", {"base_kind": "sadm"})
    with pytest.raises(ValueError, match="whole volumes"):
        build_model("sadm", {"base_kind": "vae3d"})
    model = small_sadm()
    other = DAE(DAE.config_class.from_dict({**SMALL_UNET, "channels": [8, 16, 16]}), HALF_SPEC)
    with pytest.raises(ValueError, match="other hyper-parameters"):
        model.load_base(other)


# --- through training and analysis ---------------------------------------------------------


def test_training_sits_on_a_saved_base_and_the_result_analyses_a_scan(ixi_scans, ixi_folder, tmp_path):
    from brain_uad_training.config import ConfigError, TrainingConfig
    from brain_uad_training.fit import fit

    from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
    from napari_brain_uad.analysis_cache import load_analysis, save_analysis
    from napari_brain_uad.nifti import read_nifti

    torch.manual_seed(0)
    base = DAE(DAE.config_class.from_dict({**SMALL_UNET, "channels": [8, 16, 32, 32], "strides": [2, 2, 2]}))
    base_path = save_model(tmp_path / "base.safetensors", base)
    settings = dict(data=str(tmp_path), output=str(tmp_path / "run"), kind="sadm", steps=4, batch_size=4,
                    validation_slices=4, validate_every=2, augment=False, model=SMALL)
    with pytest.raises(ConfigError, match="base_model"):
        TrainingConfig(**settings)
    with pytest.raises(ConfigError, match="another model space"):
        fit(TrainingConfig(**settings, base_model=str(base_path), spacing_mm=3.0), scans=ixi_scans, show_progress=False)
    result = fit(TrainingConfig(**settings, base_model=str(base_path)), scans=ixi_scans, show_progress=False)
    model, metadata = load_model(result.best)
    assert metadata["training_data"]["base_model"]["kind"] == "dae"
    torch.testing.assert_close(model.base.state_dict(), base.state_dict())  # the base came through unchanged

    subject = ixi_scans[1][0].subject.removesuffix("_T1")
    scan = read_nifti(ixi_folder / "scans" / f"{subject}_T1.nii.gz")
    brain = read_nifti(ixi_folder / "masks" / f"{subject}_brainmask.nii.gz")
    with pytest.raises(Exception, match="segmentation map"):
        analyse_scan(scan, base, brain_mask=brain, settings=AnalysisSettings(scorer="ssim+segmentation", device="cpu"))
    analysis = analyse_scan(scan, model, brain_mask=brain,
                            settings=AnalysisSettings(scorer="ssim+segmentation", device="cpu"))
    segmentation = analysis.model_maps["segmentation"]
    assert segmentation.shape == scan.data.shape and segmentation.max() <= 1 and segmentation[~analysis.brain_mask].max() == 0
    saved = save_analysis(analysis, tmp_path / "saved.npz", scan_sha256="a", model_sha256="b", model_metadata=metadata)
    restored, _ = load_analysis(saved, scan, scan_sha256="a")
    np.testing.assert_array_equal(restored.model_maps["segmentation"], segmentation)
    np.testing.assert_array_equal(restored.filtered.values, analysis.filtered.values)

    # The command line takes the checkpoint too, with the kind's own scorer by default.
    from napari_brain_uad.cli import main

    out = tmp_path / "map.nii.gz"
    assert main(["score", str(ixi_folder / "scans" / f"{subject}_T1.nii.gz"), "--model", str(result.best),
                 "--brain-mask", str(ixi_folder / "masks" / f"{subject}_brainmask.nii.gz"), "--device", "cpu",
                 "--out-map", str(out), "--quiet"]) == 0
    np.testing.assert_allclose(read_nifti(out).data, analysis.anomaly_map, atol=1e-5)


def test_a_labelled_sadm_learns_the_real_lesion_masks_over_every_pixel(ixi_training_slices):
    """The paper's semi-supervised setting: the targets are the lesion masks given, not
    synthetic anomalies, and no pixel is left out."""
    slices, brain = half_resolution(*ixi_training_slices)
    slices, brain = slices[:4], brain[:4]
    model = small_sadm(supervision="labelled")
    lesions = torch.zeros_like(brain)
    lesions[:2, :, 20:26, 18:30] = True
    loss = model.training_loss(slices, brain, seeded(1), excluded=lesions)
    logits = model.segmentation_logits(slices, model.base.reconstruct(slices, None))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, lesions.float())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lesion masks"):
        model.training_loss(slices, brain, seeded(1))
    with pytest.raises(ValueError, match="supervision"):
        small_sadm(supervision="weak")


def test_a_labelled_sadm_run_takes_its_lesion_masks_as_drawn_and_refuses_a_list_without_them(tmp_path):
    from brain_uad_training.config import ConfigError, TrainingConfig
    from brain_uad_training.fit import _check_exclusions_fit, lesion_mask_growth_mm

    labelled = TrainingConfig(data=(tmp_path,), output=tmp_path / "run", kind="sadm", base_model="nichart-flair-dae",
                              model={"supervision": "labelled"})
    synthetic = TrainingConfig(data=(tmp_path,), output=tmp_path / "run", kind="sadm", base_model="nichart-flair-dae")
    assert lesion_mask_growth_mm(labelled) == 0.0 and lesion_mask_growth_mm(synthetic) == synthetic.exclude_dilation_mm > 0
    with pytest.raises(ConfigError, match="labelled SADM"):
        _check_exclusions_fit(labelled, has_exclusions=False)
    _check_exclusions_fit(labelled, has_exclusions=True)
    _check_exclusions_fit(synthetic, has_exclusions=False)
