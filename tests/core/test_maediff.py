"""MAEDiff: the hierarchical partition (16 overlapping patches, 36 grid tokens on 96²), token
masking by the noised patch, an MAE encoder that sees visible tokens only, fixed sine-cosine
positions, the loss inside the patch, reconstruction over every patch, checkpoints, and training
on real slices."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from conftest import HALF_SPEC, best_constant_loss, seeded, train_and_evaluate

from napari_brain_uad.models import MODEL_KINDS, MAEDiff, MAEDiffConfig, build_model, load_model, save_model
from napari_brain_uad.models.base import random_integers
from napari_brain_uad.models.maediff import decoder_memories, sincos_positions_2d
from napari_brain_uad.models.pddpm import grid_positions
from napari_brain_uad.preprocess import ModelSpaceSpec

TINY = dict(
    channels=(16, 32, 32),
    norm_num_groups=8,
    num_head_channels=16,
    mae_encoder_depth=2,
    mae_encoder_width=32,
    mae_encoder_heads=2,
    mae_decoder_depth=2,
    mae_decoder_width=32,
    mae_decoder_heads=2,
)
# Training runs at half resolution (48²): patch 24, stride 8, grid 8 keep the paper's geometry.
HALF = dict(patch_size=24, patch_stride=8, grid_size=8)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def randomise_zero_parameters(model: torch.nn.Module) -> None:
    """MONAI's output layer and the MAE's last deconvolution start at zero; the mechanics tests
    need a network whose output depends on its input and on the MAE."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)


def tiny_maediff(randomise: bool = True, **changes) -> MAEDiff:
    torch.manual_seed(0)
    model = MAEDiff(MAEDiffConfig(**{**TINY, **changes}))
    if randomise:
        randomise_zero_parameters(model)
    return model.eval()


def hand_masked_tokens(patch: int) -> list[int]:
    """Tokens of grid patch ``patch`` (row-major of 4 × 4, stride 16 = one grid cell) on the 6 × 6
    token grid: 3 × 3 cells starting at the patch's row and column."""
    row, col = divmod(patch, 4)
    return sorted((row + i) * 6 + (col + j) for i in range(3) for j in range(3))


# --- the hierarchical partition ----------------------------------------------------------------


def test_sixteen_overlapping_patches_cover_every_pixel_with_hand_counted_overlaps():
    model = tiny_maediff(randomise=False)
    assert (model.config.patch_size, model.config.stride, model.config.grid_size) == (48, 16, 16)
    assert grid_positions(96, 48, 16) == [0, 16, 32, 48]
    masks = model.patch_masks(96, 96)
    # The paper's K = (H − p + s)(W − p + s) / s² and N = HW / r².
    assert masks.shape[0] == (96 - 48 + 16) ** 2 // 16**2 == 16
    assert model.token_count == 96 * 96 // 16**2 == 36
    assert (masks.sum(dim=(1, 2, 3)) == 48 * 48).all()
    # Along one axis a pixel in the 16-pixel bands 0..5 lies in 1, 2, 3, 3, 2, 1 patches.
    per_axis = torch.tensor([1, 2, 3, 3, 2, 1]).repeat_interleave(16)
    coverage = masks.sum(dim=0)[0]
    assert torch.equal(coverage, per_axis[:, None] * per_axis[None, :])
    assert coverage.min() == 1 and coverage.max() == 9 and coverage.sum() == 16 * 48 * 48
    assert coverage[0, 0] == 1 and coverage[40, 10] == 3 and coverage[50, 50] == 9 and coverage[20, 70] == 4


def test_config_validation_json_round_trip_and_registry():
    with pytest.raises(ValueError, match="three-level"):
        MAEDiffConfig(**{**TINY, "channels": (16, 32, 32, 32), "attention_levels": (False,) * 4})
    with pytest.raises(ValueError, match="grid_size"):
        MAEDiffConfig(grid_size=12)
    with pytest.raises(ValueError, match="multiples of grid_size"):
        MAEDiffConfig(patch_stride=8)
    with pytest.raises(ValueError, match="multiples of grid_size"):
        MAEDiffConfig(patch_size=40, patch_stride=16)
    with pytest.raises(ValueError, match="mae_decoder_width"):
        MAEDiffConfig(mae_decoder_width=100, mae_decoder_heads=3)
    with pytest.raises(ValueError, match="mae_encoder_depth"):
        MAEDiffConfig(mae_encoder_depth=0)
    with pytest.raises(ValueError, match="unknown MAEDiffConfig"):
        MAEDiffConfig.from_dict({"grid_sise": 16})
    with pytest.raises(ValueError, match="grid_size"):
        MAEDiff(MAEDiffConfig(**TINY), ModelSpaceSpec(in_plane=(88, 88)))
    for config in (MAEDiffConfig(**TINY), MAEDiffConfig(**TINY, **HALF, noise="gaussian")):
        assert MAEDiffConfig.from_dict(config.to_dict()) == config
    assert MODEL_KINDS["maediff"] is MAEDiff
    assert isinstance(build_model("maediff", {**TINY, "patch_stride": 48}), MAEDiff)


# --- the MAE: tokens masked by the noised patch, encoder on visible tokens only --------------


def test_token_masking_follows_the_drawn_patch():
    model = tiny_maediff(randomise=False)
    patches = random_integers(0, 16, (6,), seeded(7), "cpu")
    mask = model.draw_training_patches(6, 96, 96, seeded(7), "cpu")
    masked = model.masked_tokens(mask)
    visible = model.visible_tokens(mask)
    # The paper masks the grid cells of the noised patch: (p / r)² = 9 of 36, a ratio of 0.25.
    assert round(0.25 * 36) == 9
    assert masked.shape == (6, 36) and (masked.sum(dim=1) == 9).all()
    assert visible.shape == (6, 27)
    for row in range(6):
        expected = hand_masked_tokens(int(patches[row]))
        assert torch.nonzero(masked[row]).flatten().tolist() == expected
        assert visible[row].tolist() == [token for token in range(36) if token not in expected]
    # Three patches by hand: the corners and one inner patch.
    grid = model.patch_masks(96, 96)
    assert torch.nonzero(model.masked_tokens(grid[[0]])[0]).flatten().tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert torch.nonzero(model.masked_tokens(grid[[5]])[0]).flatten().tolist() == [7, 8, 9, 13, 14, 15, 19, 20, 21]
    assert torch.nonzero(model.masked_tokens(grid[[15]])[0]).flatten().tolist() == [21, 22, 23, 27, 28, 29, 33, 34, 35]


def test_masked_tokens_do_not_reach_the_encoder_but_reach_the_decoder():
    model = tiny_maediff()
    feature = torch.randn(2, 32, 24, 24, generator=seeded(0))
    visible = model.visible_tokens(model.patch_masks(96, 96)[[5, 15]])
    changed = feature.clone()
    # Token 7 (row 1, col 1) lies in patch 5, token 35 (row 5, col 5) in patch 15: both masked.
    changed[0, :, 4:8, 4:8] += 3.0
    changed[1, :, 20:24, 20:24] -= 3.0
    with torch.no_grad():
        latents = model.mae.encode(feature, visible)
        assert [latent.shape for latent in latents] == [(2, 27, 32)] * 2
        assert all(torch.equal(a, b) for a, b in zip(latents, model.mae.encode(changed, visible)))
        # The decoder processes every grid token, masked ones included.
        assert not torch.allclose(model.mae(feature, visible), model.mae(changed, visible))
        # A visible token does reach the encoder.
        visible_change = feature.clone()
        visible_change[0, :, 0:4, 0:4] += 3.0  # token 0: visible for patch 5
        assert not torch.allclose(latents[-1][0], model.mae.encode(visible_change, visible)[-1][0])
    assert model.mae.upsample(torch.zeros(1, 32, 6, 6)).shape == (1, 32, 24, 24)


def test_decoder_blocks_attend_to_encoder_blocks_u_shaped_and_uniformly():
    assert decoder_memories(12, 8) == [11, 10, 8, 7, 5, 4, 2, 1]  # the paper's 12 and 8 blocks
    assert decoder_memories(2, 2) == [1, 0] and decoder_memories(4, 4) == [3, 2, 1, 0]
    assert decoder_memories(2, 4) == [1, 1, 0, 0] and decoder_memories(3, 1) == [2]
    assert tiny_maediff(randomise=False).mae.memory_of_block == [1, 0]


def test_sincos_positions_are_fixed_buffers_with_hand_computed_values():
    positions = sincos_positions_2d(2, 3, 8)
    assert positions.shape == (6, 8)
    # Token 5 = (row 1, col 2); frequencies 1 and 1/100 for a width of 8.
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    col = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert torch.allclose(positions[5], torch.tensor(row + col), atol=1e-6)
    assert torch.allclose(positions[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))

    model = tiny_maediff()
    assert not any("position" in name for name, _ in model.named_parameters())
    assert not any("position" in name for name in model.state_dict())  # rebuilt, never stored
    assert torch.equal(model.mae.encoder_positions, sincos_positions_2d(6, 6, 32))
    before = model.mae.decoder_positions.clone()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    model.training_loss(torch.rand(2, 1, 96, 96, generator=seeded(0)), generator=seeded(0)).backward()
    optimiser.step()
    assert torch.equal(model.mae.decoder_positions, before)


def test_unet_forward_equals_monai_while_the_mae_adds_nothing():
    model = tiny_maediff(randomise=False)
    randomise_zero_parameters(model.unet)  # MONAI's zero output layer: outputs other than 0
    with torch.no_grad():
        noised = torch.rand(2, 1, 96, 96, generator=seeded(0)) * 2 - 1
        timesteps = torch.tensor([10, 700])
        visible = model.visible_tokens(model.patch_masks(96, 96)[[3, 12]])
        assert torch.equal(model.unet_with_mae(noised, timesteps, visible), model.unet(noised, timesteps))
        randomise_zero_parameters(model.mae)  # the MAE's last deconvolution now adds something
        assert not torch.allclose(model.unet_with_mae(noised, timesteps, visible), model.unet(noised, timesteps))


# --- training: noise inside one patch, loss inside that patch ----------------------------------


def test_training_noises_one_patch_masks_its_tokens_and_scores_only_inside(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:4]
    model = tiny_maediff()
    prediction = torch.rand(slices.shape, generator=seeded(1)) * 2 - 1  # what the "network" returns
    seen = {}

    def fixed_network(noised, timesteps, visible):
        seen.update(input=noised.clone(), timesteps=timesteps.clone(), visible=visible.clone())
        return seen.get("output", prediction)

    monkeypatch.setattr(model, "unet_with_mae", fixed_network)
    loss = model.training_loss(slices, generator=seeded(3))

    # training_loss draws the timesteps first, then the patch: repeat that with the same seed.
    generator = seeded(3)
    timesteps = random_integers(0, 1000, (4,), generator, "cpu")
    patches = random_integers(0, 16, (4,), generator, "cpu")
    assert torch.equal(seen["timesteps"], timesteps)
    patch_mask = model.patch_masks(96, 96)[patches]
    for row in range(4):
        hand = hand_masked_tokens(int(patches[row]))
        assert seen["visible"][row].tolist() == [token for token in range(36) if token not in hand]

    clean = slices * 2 - 1
    inside = patch_mask.expand_as(slices)
    assert torch.equal(seen["input"][~inside], clean[~inside])  # the rest of the slice stays clean
    assert (seen["input"][inside] != clean[inside]).float().mean() > 0.99

    # L1 over the 4 × 48² pixels of the noised patches, by hand.
    hand_loss = ((prediction + 1) / 2 - slices).abs()[inside].sum() / (4 * 48 * 48)
    assert loss.item() == pytest.approx(hand_loss.item(), rel=1e-5)
    # Changing the prediction outside the patch changes nothing; inside it does.
    seen["output"] = torch.where(inside, prediction, -prediction)
    assert model.training_loss(slices, generator=seeded(3)).item() == pytest.approx(loss.item(), rel=1e-6)
    seen["output"] = torch.where(inside, clean, prediction)
    assert model.training_loss(slices, generator=seeded(3)).item() < 1e-6
    assert functional.l1_loss((seen["output"] + 1) / 2, slices).item() > 0.05  # far off outside


# --- reconstruction ---------------------------------------------------------------------------


def test_reconstruction_visits_every_patch_batched_with_its_own_tokens_masked(ixi_training_slices, monkeypatch):
    slices = ixi_training_slices[0][:2]
    model = tiny_maediff()
    model.max_inputs_per_call = 6  # 16 patches × 2 slices = 32 inputs in chunks of 6
    calls = []
    original = model.unet_with_mae

    def recording(noised, timesteps, visible):
        calls.append((noised.shape[0], timesteps.clone(), visible.clone()))
        return original(noised, timesteps, visible)

    monkeypatch.setattr(model, "unet_with_mae", recording)
    first = model.reconstruct(slices, generator=seeded(5))
    assert first.shape == slices.shape and first.dtype == slices.dtype
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert [count for count, _, _ in calls] == [6] * 5 + [2]
    assert all((timesteps == 500).all() for _, timesteps, _ in calls)  # t_test
    # Input i of the flattened (patch, slice) grid is noised in patch i // 2: its cells masked.
    visible = torch.cat([visible for _, _, visible in calls])
    for index in range(32):
        hand = hand_masked_tokens(index // 2)
        assert visible[index].tolist() == [token for token in range(36) if token not in hand]

    assert torch.equal(first, model.reconstruct(slices, generator=seeded(5)))
    assert not torch.equal(first, model.reconstruct(slices, generator=seeded(6)))

    # Slow reference: one patch at a time, one noise field per slice, overlaps averaged.
    noise = model.draw_noise(slices, seeded(5))
    total, count = torch.zeros_like(slices), torch.zeros_like(slices)
    with torch.no_grad():
        for mask in model.patch_masks(96, 96):
            predicted = model.predict_patched(slices, mask[None], torch.full((2,), 500), noise)
            total += predicted * mask
            count += mask
    assert torch.allclose(first, (total / count).clamp(0, 1), atol=1e-5)


def test_save_and_load_round_trip_reconstructs_identically(ixi_training_slices, tmp_path):
    slices = ixi_training_slices[0][:2]
    model = tiny_maediff(patch_stride=32, noise="gaussian")
    path = save_model(tmp_path / "maediff.safetensors", model)
    loaded, metadata = load_model(path)
    assert isinstance(loaded, MAEDiff) and loaded.config == model.config
    assert metadata["kind"] == "maediff"
    assert torch.equal(model.mae.encoder_positions, loaded.mae.encoder_positions)
    assert torch.equal(
        model.reconstruct(slices, generator=seeded(9)), loaded.reconstruct(slices, generator=seeded(9))
    )


# --- training on real slices -----------------------------------------------------------------


def test_maediff_trains_on_real_slices(ixi_training_slices):
    slices, brain = functional.avg_pool2d(ixi_training_slices[0], 2), functional.max_pool2d(
        ixi_training_slices[1].float(), 2
    ) > 0
    torch.manual_seed(0)
    model = MAEDiff(MAEDiffConfig(**TINY, **HALF), HALF_SPEC)
    assert model.token_count == 36 and model.patch_masks(48, 48).shape[0] == 16
    before, after = train_and_evaluate(model, slices, brain, steps=20)
    assert math.isfinite(after) and after < 0.6 * before
    assert after < 0.7 * best_constant_loss(slices)  # it uses its input, not just a learned constant
