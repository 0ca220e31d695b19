"""pDDPM: the patch grid, noise and loss inside one patch in training, patches stitched back in
reconstruction, checkpoints, and training on real slices. (mDDPM's masking: test_masking.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from conftest import HALF_SPEC, best_constant_loss, half_resolution, seeded, train_and_evaluate

from napari_brain_uad.models import MODEL_KINDS, PDDPM, PDDPMConfig, build_model, load_model, save_model
from napari_brain_uad.models.base import random_integers
from napari_brain_uad.models.pddpm import grid_positions
from napari_brain_uad.preprocess import ModelSpaceSpec

SMALL = dict(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16)
# Training tests run at half resolution (48², patch 24) to stay fast on a shared CPU.


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


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


# --- training on real slices -----------------------------------------------------------------


def test_pddpm_trains_on_real_slices(ixi_training_slices):
    slices, brain = half_resolution(*ixi_training_slices)
    torch.manual_seed(0)
    model = PDDPM(PDDPMConfig(**SMALL, patch_size=24), HALF_SPEC)
    before, after = train_and_evaluate(model, slices, brain, steps=20)
    assert math.isfinite(after) and after < 0.6 * before
    assert after < 0.7 * best_constant_loss(slices)  # it uses its input, not just a learned constant
