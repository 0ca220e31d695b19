"""PHANES: the mask formula, the random ellipses, AOT-GAN's block, generator input and composite,
the stage schedule through checkpoints and a resumed run, gradients of the GAN's summed loss,
spectral norm, the scorer, and training on real slices in both stages."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import exposure
from torch.nn import functional
from torch.nn.utils import parametrize

from conftest import HALF_SPEC, half_resolution, seeded, train_and_evaluate

from napari_brain_uad import scoring
from napari_brain_uad.models import PHANES, PHANESConfig, build_model, load_model, save_model
from napari_brain_uad.models.phanes import (
    AOTBlock,
    anomaly_mask,
    gate_normalise,
    gaussian_blur,
    healthy_mask_threshold,
    normalise_95,
    random_ellipses,
    rasterise_ellipses,
)

SMALL = {"channels": [8, 16, 32], "strides": [2, 2, 2], "latent_size": 32, "generator_channels": [8, 16, 32],
         "aot_blocks": 2, "discriminator_channels": [8, 16, 16, 16], "ellipse_axis_mean": 0.75,
         "ellipse_axis_std": 1.5, "ellipse_axis_min": 1.0, "discriminator_label_sigma": 3.75}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def small_phanes(spec=HALF_SPEC, **changes) -> PHANES:
    return build_model("phanes", {**SMALL, **changes}, spec)


# --- the mask (stage b) --------------------------------------------------------------------


def test_gaussian_blur_is_scipys_reflecting_filter_and_zero_padded_on_request():
    image = torch.rand(2, 1, 11, 9, generator=seeded(0), dtype=torch.float64)
    for sigma in (1.2, 2.0):
        expected = np.stack([ndimage.gaussian_filter(image[b, 0].numpy(), sigma) for b in range(2)])[:, None]
        np.testing.assert_allclose(gaussian_blur(image, sigma).numpy(), expected, atol=1e-12)
        expected = np.stack([ndimage.gaussian_filter(image[b, 0].numpy(), sigma, mode="constant") for b in range(2)])
        np.testing.assert_allclose(gaussian_blur(image, sigma, mode="constant")[:, 0].numpy(), expected, atol=1e-12)


def test_norm95_divides_by_each_slices_95th_percentile_and_clips_at_1():
    residual = torch.tensor([[[[0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 2.0]]],
                             [[[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 5.0]]]], dtype=torch.float64)
    for b in range(2):
        values = residual[b].numpy()
        expected = np.minimum(values / (np.percentile(values, 95) + 1e-8), 1.0)
        np.testing.assert_allclose(normalise_95(residual)[b].numpy(), expected, atol=1e-12)
    # The first slice's 95th percentile lies between 0.8 and 2.0: 0.8 + 0.55 · 1.2 = 1.46.
    assert float(normalise_95(residual)[0, 0, 0, 4]) == pytest.approx(0.4 / 1.46)


def test_binarise_blur_and_grow_by_hand():
    scores = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    scores[0, 0, 4, 4] = 0.2  # one pixel above the threshold 0.153
    scores[0, 0, 1, 1] = 0.15  # one just below it: dropped (binarised, not kept as a soft score)
    mask = anomaly_mask(scores, 0.153, blur_sigma=1.2, grow_level=0.1)
    # By hand: the blurred lone pixel is g(dy)·g(dx), with g scipy's 1D kernel (radius int(4·1.2 + 0.5) = 5).
    x = np.arange(-5, 6)
    g = np.exp(-0.5 * (x / 1.2) ** 2)
    g /= g.sum()
    blurred = np.zeros((9, 9))
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            blurred[4 + dy, 4 + dx] = g[dy + 5] * g[dx + 5]
    np.testing.assert_array_equal(mask[0, 0].numpy(), (blurred > 0.1).astype(float))
    assert g[5] ** 2 > 0.1 > g[5] * g[6]  # a lone pixel stays one pixel ...
    block = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    block[0, 0, 3:6, 3:6] = 1.0  # ... a 3×3 region grows by one pixel on each side
    grown = anomaly_mask(block, 0.5)[0, 0].numpy()
    np.testing.assert_array_equal(grown, (ndimage.gaussian_filter(block[0, 0].numpy(), 1.2) > 0.1).astype(float))
    assert grown[2:7, 2:7].all() and grown.sum() == 25


def test_mask_scores_are_norm95_of_the_equalised_residual_times_the_perceptual_map(ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = small_phanes().eval()
    model.requires_grad_(False)
    x = slices[:2]
    coarse = model.coarse(x)
    scores = model.mask_scores(x, coarse)
    equalised = [np.abs(exposure.equalize_adapthist(coarse[b, 0].numpy())
                        - exposure.equalize_adapthist(x[b, 0].numpy())) for b in range(2)]
    by_hand = np.stack([np.minimum(e / (np.quantile(e, 0.95) + 1e-8), 1) for e in equalised])[:, None]
    by_hand = by_hand * model.perceptual_map(coarse, x).numpy()
    np.testing.assert_allclose(scores.numpy(), by_hand, rtol=1e-4, atol=1e-6)
    # The paper's variant takes the perceptual map of the equalised images.
    paper = small_phanes(mask_perceptual_on_equalised=True).eval()
    paper.load_state_dict(model.state_dict())
    eq_coarse = torch.from_numpy(np.stack([exposure.equalize_adapthist(c[0].numpy()) for c in coarse])[:, None]).float()
    eq_x = torch.from_numpy(np.stack([exposure.equalize_adapthist(s[0].numpy()) for s in x])[:, None]).float()
    expected = torch.from_numpy(by_hand) / model.perceptual_map(coarse, x) * paper.perceptual_map(eq_coarse, eq_x)
    torch.testing.assert_close(paper.mask_scores(x, coarse), expected.float(), rtol=1e-4, atol=1e-6)


def test_the_encoder_perceptual_map_is_zero_for_identical_images_and_smooth(ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    model = small_phanes().eval()
    model.requires_grad_(False)
    x = slices[:2]
    assert model.perceptual_map(x, x).abs().max() < 1e-5
    other = model.perceptual_map(x, x.flip(-1))
    assert other.shape == x.shape and other.min() >= 0 and other.max() <= 2 and other.mean() > 0.01
    # By hand: mean over encoder levels of 1 − cos over channels, upsampled, then σ = 2.
    levels = [functional.interpolate((1 - functional.cosine_similarity(a, b, dim=1))[:, None], size=(48, 48),
                                     mode="bilinear", align_corners=False)
              for a, b in zip(model.encoder_features(x), model.encoder_features(x.flip(-1)))]
    expected = ndimage.gaussian_filter(torch.stack(levels).mean(0).numpy(), (0, 0, 2, 2))
    np.testing.assert_allclose(other.numpy(), expected, atol=1e-5)


def test_lpips_is_refused_with_a_clear_message_where_it_is_missing():
    if importlib.util.find_spec("lpips") and importlib.util.find_spec("torchvision"):
        pytest.skip("lpips is installed here")
    with pytest.raises(ValueError, match="perceptual_network='lpips' needs the lpips"):
        small_phanes(perceptual_network="lpips")


# --- the random ellipses -------------------------------------------------------------------


def test_ten_seeded_ellipses_per_slice_lie_inside_the_slice_with_plausible_areas():
    ellipses = random_ellipses(6, (96, 96), 10, 1.5, 3.0, 1.5, seeded(0))
    assert ellipses.shape == (6, 10, 5)
    rows, columns, a, b, angle = ellipses.unbind(-1)
    assert rows.min() >= 24 and rows.max() < 72 and columns.min() >= 24 and columns.max() < 72
    assert a.min() >= 1.5 and b.min() >= 1.5 and max(a.max(), b.max()) <= 24
    assert angle.min() >= 0 and angle.max() < math.pi
    torch.testing.assert_close(ellipses, random_ellipses(6, (96, 96), 10, 1.5, 3.0, 1.5, seeded(0)))
    assert not torch.equal(ellipses, random_ellipses(6, (96, 96), 10, 1.5, 3.0, 1.5, seeded(1)))
    # Each ellipse alone: non-empty, its pixel count close to π·a·b, never touching the border.
    for index in range(10):
        single = rasterise_ellipses(ellipses[:, index : index + 1], (96, 96))[:, 0]
        area = single.sum(dim=(1, 2))
        expected = math.pi * a[:, index] * b[:, index]
        assert (area >= 1).all()
        large = expected > 30
        assert torch.allclose(area[large], expected[large], rtol=0.2)
        assert single[:, 0].sum() == single[:, -1].sum() == single[:, :, 0].sum() == single[:, :, -1].sum() == 0
    union = rasterise_ellipses(ellipses, (96, 96))
    assert union.shape == (6, 1, 96, 96) and set(union.unique().tolist()) <= {0.0, 1.0}
    # Semi-axes |N(1.5, 3)| ≥ 1.5 px: ten ellipses cover well under a tenth of a 96² slice.
    assert ((union.mean(dim=(1, 2, 3)) > 0.002) & (union.mean(dim=(1, 2, 3)) < 0.1)).all()


def test_a_rotated_ellipse_by_hand():
    ellipse = torch.tensor([[[5.0, 5.0, 3.0, 1.0, math.pi / 2]]])  # long axis vertical after rotation
    mask = rasterise_ellipses(ellipse, (11, 11))[0, 0]
    assert mask[2:9, 5].all() and mask[5, 4:7].all() and not mask[1, 5] and not mask[5, 3] and mask.sum() == 7 + 2


# --- AOT-GAN ---------------------------------------------------------------------------------


def test_the_aot_block_has_dilations_1_2_4_8_and_a_gated_residual():
    torch.manual_seed(0)
    block = AOTBlock(16, (1, 2, 4, 8))
    convolutions = [branch[1] for branch in block.branches]
    assert [conv.dilation for conv in convolutions] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [conv.out_channels for conv in convolutions] == [4, 4, 4, 4]
    assert [branch[0].padding for branch in block.branches] == [(r, r, r, r) for r in (1, 2, 4, 8)]
    x = torch.randn(2, 16, 20, 20)
    fused = block.fuse(torch.cat([branch(x) for branch in block.branches], 1))
    gate = block.gate(x)
    mean, std = gate.mean((2, 3), keepdim=True), gate.std((2, 3), keepdim=True) + 1e-9
    g = torch.sigmoid(5 * (2 * (gate - mean) / std - 1))
    torch.testing.assert_close(block(x), x * (1 - g) + fused * g)
    assert block(x).shape == x.shape
    # The gate's normalisation by hand on four numbers (unbiased standard deviation).
    values = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    sd = math.sqrt(5 / 3)
    expected = [5 * (2 * (v - 1.5) / sd - 1) for v in (0.0, 1.0, 2.0, 3.0)]
    torch.testing.assert_close(gate_normalise(values).flatten(), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_the_generator_reads_the_slice_with_masked_pixels_at_1_plus_the_mask_and_only_fills_the_mask(
        ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = small_phanes().eval()
    x = slices[:3]
    threshold = healthy_mask_threshold(model, x, percentile=97.0)
    assert threshold > 0
    model.config = model.config.replace(mask_threshold=threshold)
    seen = []
    model.generator.register_forward_pre_hook(lambda module, args: seen.append(args))
    pseudo_healthy, maps = model.reconstruct_with_maps(x)
    (masked, mask), = seen
    assert set(mask.unique().tolist()) == {0.0, 1.0} and 0 < mask.mean() < 0.5
    torch.testing.assert_close(mask, maps["mask"])
    assert masked.shape == mask.shape == x.shape
    assert (masked[mask == 1] == 1).all() and torch.equal(masked[mask == 0], x[mask == 0])
    torch.testing.assert_close(model.generator_input(x, mask), masked)
    # x_ph = x ⊙ (1 − m) + G ⊙ m: unmasked pixels are exactly the input's.
    assert torch.equal(pseudo_healthy[mask == 0], x[mask == 0])
    expected = model.generator(masked, mask).clamp(0, 1)
    torch.testing.assert_close(pseudo_healthy[mask == 1], expected[mask == 1])
    assert pseudo_healthy.shape == maps["perceptual"].shape == x.shape
    assert pseudo_healthy.min() >= 0 and pseudo_healthy.max() <= 1
    assert maps["perceptual"].min() >= 0 and maps["perceptual"].max() <= 2
    torch.testing.assert_close(maps["perceptual"], model.perceptual_map(pseudo_healthy, x))
    torch.testing.assert_close(model.reconstruct(x), pseudo_healthy)


def test_the_discriminator_is_spectrally_normalised():
    model = small_phanes().train()
    convolutions = [layer for layer in model.discriminator.conv if isinstance(layer, torch.nn.Conv2d)]
    normed = [parametrize.is_parametrized(conv, "weight") for conv in convolutions]
    assert normed == [True] * 4 + [False]  # every layer but the output
    assert all(type(conv.parametrizations.weight[0]).__name__ == "_SpectralNorm" for conv in convolutions[:4])
    image = torch.rand(2, 1, 48, 48)
    for _ in range(30):  # power iterations
        model.discriminator(image)
    for conv in convolutions[:4]:
        assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2) == pytest.approx(1.0, abs=0.02)


def test_the_discriminators_loss_never_reaches_the_generator_and_the_adversarial_term_never_the_discriminator(
        ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = small_phanes(vae_steps=0).train()
    x = slices[:4]
    mask = model.training_masks(x, seeded(0))
    prediction, composite = model.inpaint(x, mask)
    discriminator_loss, adversarial = model.adversarial_losses(x, composite, mask)
    generator, discriminator = list(model.generator.parameters()), list(model.discriminator.parameters())

    def gradients(loss, parameters):
        return torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)

    assert all(g is None for g in gradients(adversarial, discriminator))
    assert any(g is not None and g.abs().sum() > 0 for g in gradients(adversarial, generator))
    assert all(g is None for g in gradients(discriminator_loss, generator))
    assert all(g is not None for g in gradients(discriminator_loss, discriminator))
    # The summed stage-(c) loss: the VAE gets nothing, both players get their gradients.
    loss = model.training_loss(x, None, seeded(0))
    loss.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is not None for p in model.generator.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())


# --- the stage schedule -------------------------------------------------------------------


def test_the_stage_advances_only_in_training_and_switches_after_vae_steps(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = small_phanes(vae_steps=2)
    x = slices[:2]
    model.eval()
    assert model.stage == "vae" and int(model.steps_done) == 0
    torch.testing.assert_close(model.training_loss(x, None, seeded(1)), model.vae_loss(x, seeded(1)))
    assert int(model.steps_done) == 0  # validation does not advance it
    model.train()
    for expected_stage in ("vae", "vae"):
        assert model.stage == expected_stage
        model.training_loss(x, None, seeded(1)).backward()
        assert model.generator.encoder[1].weight.grad is None
        assert model.vae.network.encode[0].conv.unit0.conv.weight.grad is not None
    assert int(model.steps_done) == 2 and model.stage == "inpainting"
    model.zero_grad(set_to_none=True)
    model.training_loss(x, None, seeded(1)).backward()
    assert int(model.steps_done) == 3 and model.vae.network.encode[0].conv.unit0.conv.weight.grad is None
    # In evaluation, the inpainting stage's loss is the generator's weighted inpainting terms.
    model.eval()
    loss = model.training_loss(x, None, seeded(2))
    generator = seeded(2)
    mask = model.training_masks(x, generator)
    terms = model.inpainting_losses(x, model.inpaint(x, mask)[0])
    torch.testing.assert_close(loss, terms["l1"] + 250 * terms["style"] + 0.1 * terms["perceptual"])
    assert int(model.steps_done) == 3


def test_checkpoint_round_trip_keeps_weights_and_stage(tmp_path, ixi_training_slices):
    slices, _ = half_resolution(*ixi_training_slices)
    torch.manual_seed(1)
    model = small_phanes(vae_steps=1, mask_threshold=0.02)
    model.train()
    model.training_loss(slices[:2], None, seeded(0))
    model.training_loss(slices[:2], None, seeded(0))
    model.eval()
    path = save_model(tmp_path / "phanes.safetensors", model)
    loaded, metadata = load_model(path)
    assert metadata["kind"] == "phanes" and metadata["hyperparameters"]["mask_threshold"] == 0.02
    assert int(loaded.steps_done) == 2 and loaded.stage == "inpainting"
    first, first_maps = model.reconstruct_with_maps(slices[:3])
    second, second_maps = loaded.reconstruct_with_maps(slices[:3])
    torch.testing.assert_close(first, second)
    for name in PHANES.extra_maps:
        torch.testing.assert_close(first_maps[name], second_maps[name])


def test_a_resumed_run_continues_in_the_stage_it_reached(tmp_path, ixi_folder, ixi_scans):
    from brain_uad_training.config import TrainingConfig
    from brain_uad_training.fit import fit

    model = {**SMALL, "channels": [8, 16, 16, 32], "strides": [2, 2, 2, 2], "vae_steps": 2}
    settings = dict(data=str(ixi_folder / "scans"), brain_masks=str(ixi_folder / "masks"), output=str(tmp_path / "run"),
                    kind="phanes", model=model, batch_size=2, validation_fraction=0.34, validation_slices=2,
                    validate_every=2, augment=False, data_description="IXI", data_licence="CC BY-SA 3.0")
    first = fit(TrainingConfig(**settings, steps=3), show_progress=False, scans=ixi_scans)
    trained, _ = load_model(first.last)
    assert int(trained.steps_done) == 3 and trained.stage == "inpainting"  # validations did not count
    resumed = fit(TrainingConfig(**settings, steps=4), resume=True, show_progress=False, scans=ixi_scans)
    trained, _ = load_model(resumed.last)
    assert resumed.steps_done == 4 and int(trained.steps_done) == 4


# --- the scorer ------------------------------------------------------------------------------


def test_the_phanes_scorer_is_the_residual_times_the_perceptual_map_by_hand():
    image = np.array([[0.2, 0.4], [0.6, 0.8]])
    pseudo_healthy = np.array([[0.2, 0.1], [0.9, 0.8]])
    perceptual = np.array([[0.5, 2.0], [0.25, 1.0]])
    result = scoring.score("phanes", image, pseudo_healthy, maps={"perceptual": perceptual})
    np.testing.assert_allclose(result, [[0.0, 0.6], [0.075, 0.0]])
    masked = scoring.score("phanes", image, pseudo_healthy, mask=np.array([[1, 0], [1, 1]]),
                           maps={"perceptual": perceptual})
    np.testing.assert_allclose(masked, [[0.0, 0.0], [0.075, 0.0]])
    assert scoring.SCORERS["phanes"].needs_maps == ("perceptual",)
    assert "phanes" in scoring.scorer_names(maps=PHANES.extra_maps) and "phanes" not in scoring.scorer_names(maps=())


# --- settings and training -----------------------------------------------------------------


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="perceptual_network"):
        PHANESConfig(perceptual_network="vgg")
    with pytest.raises(ValueError, match="AOT branches"):
        PHANESConfig(generator_channels=(8, 16, 30))
    with pytest.raises(ValueError, match="vae_steps"):
        PHANESConfig(vae_steps=-1)
    with pytest.raises(ValueError, match="channels"):
        PHANESConfig(channels=(8, 16), strides=(2,))  # the VAE's own check
    with pytest.raises(ValueError, match="divide the slice size"):
        build_model("phanes", {"channels": [8, 8, 8, 8, 8], "strides": [2, 2, 2, 2, 4]})
    assert not PHANES.uses_noise_level and PHANES.extra_maps == ("mask", "perceptual")


def test_both_stages_train_on_real_slices_with_a_falling_loss(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    vae = small_phanes(vae_steps=1000)
    before, after = train_and_evaluate(vae, slices, brain, steps=15)
    assert vae.stage == "vae" and math.isfinite(after) and after < 0.8 * before
    torch.manual_seed(0)
    gan = small_phanes(vae_steps=0)
    gan.vae.load_state_dict(vae.vae.state_dict())  # stage (c) on the VAE just trained
    vae_before = {k: v.clone() for k, v in gan.vae.state_dict().items()}
    before, after = train_and_evaluate(gan, slices, brain, steps=15)
    assert gan.stage == "inpainting" and math.isfinite(after) and after < 0.8 * before
    for key, value in gan.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key  # the VAE is frozen in stage (c)


def test_the_inference_mask_threshold_is_measured_on_healthy_slices_when_stage_c_starts(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(3)
    model = small_phanes(vae_steps=1)
    assert model.config.mask_threshold is None and math.isnan(float(model.measured_mask_threshold))
    model.train()
    model.training_loss(slices[:4], brain[:4], seeded(0))  # stage (a)
    assert math.isnan(float(model.measured_mask_threshold))
    expected = healthy_mask_threshold(model, slices[4:8], 99.0, brain[4:8])
    model.train()
    model.training_loss(slices[4:8], brain[4:8], seeded(1))  # the first step of stage (c)
    assert float(model.measured_mask_threshold) == pytest.approx(expected, rel=1e-5)
    assert model.inference_mask_threshold == pytest.approx(expected, rel=1e-5)
    model.training_loss(slices[:4], brain[:4], seeded(2))  # measured once, then kept
    assert float(model.measured_mask_threshold) == pytest.approx(expected, rel=1e-5)
    # A fixed threshold in the config wins.
    assert small_phanes(mask_threshold=0.153).inference_mask_threshold == 0.153


def test_the_training_mask_threshold_is_on_the_inference_thresholds_scale(ixi_training_slices, monkeypatch):
    """The code's 0.1 (training) and 0.153 (inference) are on LPIPS's scale; ours keeps their
    ratio on the scale of the perceptual network in use, so training masks are larger than the
    test-time ones but of the same order, not most of the brain."""
    from napari_brain_uad.models import phanes as phanes_module

    assert phanes_module.TRAINING_THRESHOLD_RATIO == pytest.approx(0.1 / 0.153)
    slices, brain = half_resolution(*ixi_training_slices)
    model = small_phanes(vae_steps=0)
    model.measured_mask_threshold.fill_(0.42)
    assert model.inference_mask_threshold == pytest.approx(0.42)
    assert model.training_mask_threshold == pytest.approx(0.42 * 0.1 / 0.153)
    # The training masks binarise at that threshold (the ellipses come on top of it).
    used = []
    original = model.anomaly_mask
    monkeypatch.setattr(model, "anomaly_mask", lambda s, c, threshold: used.append(threshold) or original(s, c, threshold))
    model.training_masks(slices[:2], seeded(0))
    assert used == [pytest.approx(0.42 * 0.1 / 0.153)]
    # A configured training threshold wins; a model that never measured one scales it back.
    fixed = small_phanes(training_mask_threshold=0.1)
    assert fixed.training_mask_threshold == 0.1
    assert fixed.inference_mask_threshold == pytest.approx(0.153)


def test_phanes_map_is_post_processed_as_the_paper_says_and_sadms_segmentation_after_the_median():
    phanes_scorer = scoring.SCORERS["phanes"]
    assert not phanes_scorer.median_filtered and not phanes_scorer.brain_eroded
    assert phanes_scorer.part_after_median({"perceptual": np.ones((2, 2, 2))}) is None
    segmentation = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 8
    brain = np.ones((2, 2, 2), dtype=bool)
    brain[0, 0, 0] = False
    for name in ("ssim+segmentation", "residual+segmentation"):
        scorer = scoring.SCORERS[name]
        assert scorer.median_filtered and scorer.brain_eroded
        np.testing.assert_allclose(scorer.part_after_median({"segmentation": segmentation}), segmentation)
        weighted = scorer.part_after_median({"segmentation": segmentation}, brain, weight=0.25)
        np.testing.assert_allclose(weighted, np.where(brain, 0.75 * segmentation, 0), rtol=1e-6)
    assert all(scoring.SCORERS[name].part_after_median({}) is None for name in ("residual", "ssim", "mhd-diag"))
