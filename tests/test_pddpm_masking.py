"""pDDPM (patch-wise noising, stitched reconstruction) and mDDPM masking (IPM, FPM, FPM-CutMix)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from napari_brain_uad.models import (
    DDPM,
    MODEL_KINDS,
    PDDPM,
    DDPMConfig,
    PDDPMConfig,
    build_model,
    load_model,
    save_model,
)
from napari_brain_uad.models.base import random_integers
from napari_brain_uad.models.masking import (
    apply_masking,
    choose_patches,
    frequency_patch_filter,
    patch_brain,
    patch_grid_shape,
    patches_to_pixels,
)
from napari_brain_uad.models.pddpm import grid_positions
from napari_brain_uad.preprocess import ModelSpaceSpec

SMALL = dict(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16)
# Training tests run at half resolution (48², patch 24) to stay fast on a shared CPU.
HALF_SPEC = ModelSpaceSpec(in_plane=(48, 48))


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On a shared two-core machine torch's two intra-op threads contend with other processes
    (a training step here took 6 s with two threads, 0.1 s with one); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_zero_parameters(model: torch.nn.Module) -> None:
    """MONAI zero-initialises the output layer (an untrained net returns a constant); the
    mechanics tests need a net whose output depends on its input."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)


def small_pddpm(**changes) -> PDDPM:
    torch.manual_seed(0)
    model = PDDPM(PDDPMConfig(**{**SMALL, **changes}))
    randomise_zero_parameters(model)
    return model.eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def half_resolution(slices: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return functional.avg_pool2d(slices, 2), functional.max_pool2d(brain.float(), 2) > 0


# --- the patch grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, patch, stride, expected",
    [
        (96, 48, 48, [0, 48]),
        (96, 48, 32, [0, 32, 48]),
        (96, 60, 60, [0, 36]),
        (100, 48, 48, [0, 48, 52]),
        (96, 96, 96, [0]),
        (97, 10, 3, None),
        (50, 7, 7, None),
    ],
)
def test_grid_positions_cover_every_pixel(size, patch, stride, expected):
    positions = grid_positions(size, patch, stride)
    if expected is not None:
        assert positions == expected
    covered = torch.zeros(size, dtype=torch.bool)
    for start in positions:
        covered[start : start + patch] = True
    assert covered.all()
    assert positions[0] == 0 and positions[-1] == size - patch
    assert all(0 < later - earlier <= stride for earlier, later in zip(positions, positions[1:]))


def test_patch_masks_tile_the_slice():
    model = PDDPM(PDDPMConfig(**SMALL, patch_size=48, patch_stride=32))
    masks = model.patch_masks(96, 96)
    assert masks.shape == (9, 1, 96, 96)
    assert (masks.sum(dim=(1, 2, 3)) == 48 * 48).all()
    coverage = masks.sum(dim=0)
    assert coverage.min() >= 1 and coverage.max() == 4  # overlaps where four patches meet
    assert PDDPM(PDDPMConfig(**SMALL)).patch_masks(96, 96).sum(dim=0).eq(1).all()  # default: no overlap


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="patch_stride"):
        PDDPMConfig(patch_size=32, patch_stride=40)
    with pytest.raises(ValueError, match="patch_stride"):
        PDDPMConfig(patch_stride=0)
    with pytest.raises(ValueError, match="patch_size"):
        PDDPMConfig(patch_size=0)
    with pytest.raises(ValueError, match="unknown PDDPMConfig"):
        PDDPMConfig.from_dict({"patch_size": 48, "patch_sise": 48})
    with pytest.raises(ValueError, match="does not fit"):
        PDDPM(PDDPMConfig(**SMALL, patch_size=64), ModelSpaceSpec(in_plane=(48, 48)))
    for config in (PDDPMConfig(**SMALL), PDDPMConfig(**SMALL, patch_size=60, patch_stride=12, masking="ipm")):
        assert PDDPMConfig.from_dict(config.to_dict()) == config
    assert MODEL_KINDS["pddpm"] is PDDPM
    assert isinstance(build_model("pddpm", {**SMALL, "patch_stride": 24}), PDDPM)


# --- training: noise inside one patch, loss inside that patch ----------------------------------


def test_training_noises_only_one_grid_patch_per_slice(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:6]
    model = small_pddpm()
    seen = {}

    def recording_denoise(noised, timesteps, clean):
        seen["input"] = noised.detach().clone()
        return noised

    monkeypatch.setattr(model, "denoise", recording_denoise)
    model.training_loss(slices, generator=seeded(3))

    # training_loss draws the timesteps first, then the patch: repeat that with the same seed.
    generator = seeded(3)
    random_integers(0, model.config.timesteps, (6,), generator, "cpu")
    patch_mask = model.draw_training_patches(6, 96, 96, generator, "cpu")
    grid = model.patch_masks(96, 96)
    assert all(any(torch.equal(mask, patch) for patch in grid) for mask in patch_mask)

    clean = slices * 2.0 - 1.0
    network_input = seen["input"]
    outside = ~patch_mask.expand_as(slices)
    assert torch.equal(network_input[outside], clean[outside])  # context is the clean slice, exactly
    inside = patch_mask.expand_as(slices)
    assert (network_input[inside] != clean[inside]).float().mean() > 0.99  # the patch is noised


def test_patched_input_noises_inside_the_patch_at_the_given_level(ixi_training_slices):
    slices = ixi_training_slices[0][:2]
    model = small_pddpm()
    mask = model.patch_masks(96, 96)[1:2]
    noise = torch.randn(slices.shape, generator=seeded(0))
    timesteps = torch.tensor([100, 900])
    network_input = model.patched_input(slices, mask, timesteps, noise)
    full = model.scheduler.add_noise(slices * 2 - 1, noise, timesteps)
    inside = mask.expand_as(slices)
    assert torch.equal(network_input[inside], full[inside])
    assert torch.equal(network_input[~inside], (slices * 2 - 1)[~inside])


def test_patch_loss_counts_only_pixels_inside_the_patch():
    target = torch.rand(3, 1, 32, 32, generator=seeded(1))
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.bool)
    mask[:, :, 8:24, 4:20] = True
    wrong_outside = torch.where(mask, target, 1.0 - target)
    assert PDDPM.patch_loss(wrong_outside, target, mask).item() == 0.0
    wrong_inside = torch.where(mask, target + 0.25, target)
    assert PDDPM.patch_loss(wrong_inside, target, mask).item() == pytest.approx(0.25, abs=1e-6)


def test_training_loss_is_zero_for_a_network_right_inside_the_patch_only(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:4]
    model = small_pddpm()

    outputs = []

    def right_in_noised_region_only(noised, timesteps, clean):
        clean_scaled = clean * 2.0 - 1.0
        outputs.append(torch.where(noised != clean_scaled, clean_scaled, -clean_scaled))
        return outputs[-1]

    monkeypatch.setattr(model, "denoise", right_in_noised_region_only)
    assert model.training_loss(slices, generator=seeded(0)).item() < 1e-4
    # Judged on the whole slice, the same prediction is far off.
    assert functional.l1_loss((outputs[0] + 1) / 2, slices).item() > 0.05


# --- reconstruction ---------------------------------------------------------------------------


def test_reconstruction_shape_range_and_determinism(ixi_training_slices):
    slices = ixi_training_slices[0][:3]
    model = small_pddpm(patch_stride=32)
    first = model.reconstruct(slices, generator=seeded(5))
    assert first.shape == slices.shape and first.dtype == slices.dtype
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, model.reconstruct(slices, generator=seeded(5)))
    assert not torch.equal(first, model.reconstruct(slices, generator=seeded(6)))
    ensemble = model.reconstruct(slices, t=[250, 500], generator=seeded(5))
    assert ensemble.shape == slices.shape


def test_overlapping_patches_stitch_back_the_clean_slice(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:3]
    model = small_pddpm(patch_stride=20)  # positions 0, 20, 40, 48: uneven overlaps

    def perfect_denoiser(noised, timesteps, clean):
        return clean * 2.0 - 1.0

    monkeypatch.setattr(model, "denoise", perfect_denoiser)
    assert torch.allclose(model.reconstruct(slices, generator=seeded(0)), slices, atol=1e-6)


def test_batched_reconstruction_equals_a_per_patch_loop(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:3]
    model = small_pddpm(patch_stride=32)
    model.max_inputs_per_call = 4  # chunks that straddle patches: 9 patches × 3 slices = 27 inputs
    calls = []
    original_denoise = model.denoise

    def counting_denoise(noised, timesteps, clean):
        calls.append(noised.shape[0])
        return original_denoise(noised, timesteps, clean)

    monkeypatch.setattr(model, "denoise", counting_denoise)
    batched = model.reconstruct(slices, t=400, generator=seeded(2))
    assert calls == [4] * 6 + [3]

    # Slow reference: one patch at a time, the same noise field for every patch of a slice.
    noise = model.draw_noise(slices, seeded(2))
    timesteps = torch.full((3,), 400)
    total, count = torch.zeros_like(slices), torch.zeros_like(slices)
    with torch.no_grad():
        for mask in model.patch_masks(96, 96):
            predicted = model.predict_patched(slices, mask, timesteps, noise)
            total += predicted * mask
            count += mask
    assert torch.allclose(batched, (total / count).clamp(0, 1), atol=1e-5)


def test_save_and_load_round_trip_reconstructs_identically(ixi_training_slices, tmp_path):
    slices = ixi_training_slices[0][:2]
    model = small_pddpm(patch_size=40, patch_stride=28, masking="fpm-cutmix")
    path = save_model(tmp_path / "pddpm.safetensors", model)
    loaded, metadata = load_model(path)
    assert isinstance(loaded, PDDPM) and loaded.config == model.config
    assert metadata["kind"] == "pddpm"
    assert torch.equal(
        model.reconstruct(slices, generator=seeded(9)), loaded.reconstruct(slices, generator=seeded(9))
    )


# --- masking ----------------------------------------------------------------------------------


def test_masking_rejects_unknown_strategy_and_bad_ratio():
    slices = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="strategy"):
        apply_masking(slices, None, "cutout")
    for ratio in ((0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.5,)):
        with pytest.raises(ValueError, match="ratio"):
            apply_masking(slices, None, "ipm", ratio=ratio)
    with pytest.raises(ValueError, match="patch"):
        apply_masking(slices, None, "ipm", patch=0)


def test_masked_fraction_of_brain_patches_lies_in_the_drawn_range(ixi_training_slices):
    _, brain = ixi_training_slices
    low, high, patch = 0.3, 0.6, 8
    eligible = patch_brain(brain, patch)
    chosen = choose_patches(eligible, (low, high), seeded(0))
    assert not (chosen & ~eligible).any()  # only brain patches
    counts = eligible.sum(dim=(1, 2)).float()
    fractions = chosen.sum(dim=(1, 2)).float() / counts
    rounding = 0.5 / counts
    assert ((fractions >= low - rounding) & (fractions <= high + rounding)).all()
    assert fractions.std() > 0  # drawn per slice
    # Ratio 0 and 1 are exact.
    assert not choose_patches(eligible, (0.0, 0.0), seeded(0)).any()
    assert torch.equal(choose_patches(eligible, (1.0, 1.0), seeded(0)), eligible)


def test_ipm_zeroes_exactly_the_chosen_brain_patches(ixi_training_slices):
    slices, brain = ixi_training_slices
    masked = apply_masking(slices, brain, "ipm", ratio=(0.2, 0.8), patch=8, generator=seeded(4))
    chosen = patches_to_pixels(choose_patches(patch_brain(brain, 8), (0.2, 0.8), seeded(4)), 8, (96, 96)) & brain
    assert (masked[chosen] == 0).all()
    assert torch.equal(masked[~chosen], slices[~chosen])
    # Most brain patches that were chosen held signal: IPM really removed tissue.
    assert slices[chosen].mean() > 0.1


@pytest.mark.parametrize("strategy", ["ipm", "fpm", "fpm-cutmix"])
def test_masking_keeps_the_background_and_is_seeded(ixi_training_slices, strategy):
    slices, brain = ixi_training_slices
    slices = torch.where(brain, slices, torch.full_like(slices, 0.3))  # a visible background
    first = apply_masking(slices, brain, strategy, generator=seeded(1))
    assert first.shape == slices.shape and first.dtype == slices.dtype
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first[~brain], slices[~brain])
    assert not torch.equal(first[brain], slices[brain])
    assert torch.equal(first, apply_masking(slices, brain, strategy, generator=seeded(1)))
    assert not torch.equal(first, apply_masking(slices, brain, strategy, generator=seeded(2)))


def test_masking_without_brain_mask_uses_non_zero_pixels(ixi_training_slices):
    slices, _ = ixi_training_slices
    for strategy in ("ipm", "fpm", "fpm-cutmix"):
        assert torch.equal(
            apply_masking(slices, None, strategy, generator=seeded(0)),
            apply_masking(slices, slices > 0, strategy, generator=seeded(0)),
        )


def mirrored(spectrum_mask: torch.Tensor) -> torch.Tensor:
    """Frequency -k of every frequency k of a centred (fftshift-ed) even-sized spectrum."""
    return torch.roll(spectrum_mask.flip(-2, -1), shifts=(1, 1), dims=(-2, -1))


def centred_spectrum(images: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(images.double()), dim=(-2, -1))


def test_fpm_changes_the_spectrum_only_in_masked_frequency_patches(ixi_training_slices):
    slices = ixi_training_slices[0][:4]
    spectrum_patches = torch.ones(4, *patch_grid_shape((96, 96), 8), dtype=torch.bool)
    masked_frequencies = patches_to_pixels(choose_patches(spectrum_patches, (0.2, 0.4), seeded(0)), 8, (96, 96))
    filtered = frequency_patch_filter(slices.double(), ~masked_frequencies)

    before, after = centred_spectrum(slices), centred_spectrum(filtered)
    touched = masked_frequencies | mirrored(masked_frequencies)
    assert torch.allclose(after[~touched], before[~touched], atol=1e-8)
    both = masked_frequencies & mirrored(masked_frequencies)
    assert after[both].abs().max() < 1e-8  # masked twice over: removed
    changed = (after - before).abs() > 1e-6 * before.abs().max()
    assert changed[touched].float().mean() > 0.9
    # Real part of the inverse transform = each frequency weighted by the mean of its own and its
    # mirror's mask.
    weights = ((~masked_frequencies).double() + (~mirrored(masked_frequencies)).double()) / 2
    assert torch.allclose(after, before * weights, atol=1e-8)


def test_fpm_output_is_the_filtered_slice_inside_the_brain(ixi_training_slices):
    slices, brain = ixi_training_slices
    masked = apply_masking(slices, brain, "fpm", ratio=(0.1, 0.9), patch=8, generator=seeded(7))
    spectrum_patches = torch.ones(16, *patch_grid_shape((96, 96), 8), dtype=torch.bool)
    kept = ~patches_to_pixels(choose_patches(spectrum_patches, (0.1, 0.9), seeded(7)), 8, (96, 96))
    expected = frequency_patch_filter(slices, kept).clamp(0, 1)
    assert torch.allclose(masked[brain], expected[brain], atol=1e-6)


def test_fpm_cutmix_pastes_filtered_content_only_inside_chosen_patches(ixi_training_slices):
    slices, brain = ixi_training_slices
    masked = apply_masking(slices, brain, "fpm-cutmix", ratio=(0.2, 0.6), patch=8, generator=seeded(5))
    # Same order of draws as apply_masking: image patches, then spectrum patches.
    generator = seeded(5)
    chosen = patches_to_pixels(choose_patches(patch_brain(brain, 8), (0.2, 0.6), generator), 8, (96, 96)) & brain
    spectrum_patches = torch.ones(16, *patch_grid_shape((96, 96), 8), dtype=torch.bool)
    kept = ~patches_to_pixels(choose_patches(spectrum_patches, (0.2, 0.6), generator), 8, (96, 96))
    filtered = frequency_patch_filter(slices, kept).clamp(0, 1)
    assert torch.equal(masked[~chosen], slices[~chosen])
    assert torch.allclose(masked[chosen], filtered[chosen], atol=1e-6)
    assert (masked[chosen] - slices[chosen]).abs().mean() > 0.02


# --- training on real slices -----------------------------------------------------------------


def train_and_evaluate(model, slices, brain, steps: int) -> tuple[float, float]:
    """Loss on a fixed draw (seeded timesteps, patches, masks and noise) before and after a few
    seeded Adam steps."""

    def evaluation_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.training_loss(slices, brain, generator=seeded(1234)).item()

    before = evaluation_loss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = seeded(0)
    model.train()
    for step in range(steps):
        batch = random_integers(0, slices.shape[0], (8,), generator, "cpu")
        loss = model.training_loss(slices[batch], brain[batch], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return before, evaluation_loss()


def best_constant_loss(slices: torch.Tensor) -> float:
    """L1 of the best constant prediction (the median): what a net ignoring its input reaches."""
    return (slices - slices.median()).abs().mean().item()


def test_pddpm_trains_on_real_slices(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = PDDPM(PDDPMConfig(**SMALL, patch_size=24), HALF_SPEC)
    before, after = train_and_evaluate(model, slices, brain, steps=20)
    assert math.isfinite(after) and after < 0.6 * before
    assert after < 0.7 * best_constant_loss(slices)  # it uses its input, not just a learned constant


@pytest.mark.parametrize("masking", ["ipm", "fpm"])
def test_ddpm_with_masking_trains_on_real_slices(ixi_training_slices, masking):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(**SMALL, masking=masking), HALF_SPEC)
    # The masked input really differs from the clean target the loss compares with.
    masked = model.mask_for_training(slices, brain, seeded(0))
    assert not torch.equal(masked, slices)
    before, after = train_and_evaluate(model, slices, brain, steps=15)
    assert math.isfinite(after) and after < 0.7 * before
    assert after < 0.7 * best_constant_loss(slices)
