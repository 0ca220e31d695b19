"""mDDPM's masking (IPM, FPM, FPM-CutMix; ``models/masking.py``): what is masked, in image and
frequency space, seeded; and a DDPM trained with it on real slices."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import HALF_SPEC, best_constant_loss, half_resolution, seeded, train_and_evaluate

from napari_brain_uad.models import DDPM, DDPMConfig
from napari_brain_uad.models.masking import (
    apply_masking,
    choose_patches,
    frequency_patch_filter,
    patch_brain,
    patch_grid_shape,
    patches_to_pixels,
)

SMALL = dict(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16)
# Training tests run at half resolution (48²) to stay fast on a shared CPU.


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --- what is masked ---------------------------------------------------------------------------


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


# --- a DDPM trained with masking, on real slices ----------------------------------------------


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
