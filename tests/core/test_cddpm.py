"""cDDPM: FiLM conditioning on a context vector from the input, training on real slices,
checkpoints. (The masked pre-training of its encoder is training's: test_pretrain_encoder.py.)"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch.nn import functional

from napari_brain_uad.checkpoint import CheckpointError, save_checkpoint
from napari_brain_uad.models import MODEL_KINDS, CDDPM, CDDPMConfig, build_model, load_model, save_model
from napari_brain_uad.models.cddpm import FiLMResnetBlock

from conftest import SMALL_CDDPM as SMALL


def randomise_zero_parameters(model: torch.nn.Module) -> None:
    """MONAI zero-initialises each residual block's last convolution and the output layer, and
    we zero the FiLM projections: an untrained net ignores its input and its context. The
    mechanics tests need a net whose output depends on both."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)


@pytest.fixture
def model():
    torch.manual_seed(0)
    cddpm = CDDPM(SMALL)
    randomise_zero_parameters(cddpm)
    return cddpm.eval()


def film_block(conditioning_dim=6, channels=8):
    torch.manual_seed(1)
    block = FiLMResnetBlock(2, channels, conditioning_dim, channels, norm_num_groups=4)
    with torch.no_grad():
        block.conv2.conv.weight.normal_(0.0, 0.1)
    return block


def test_film_block_computes_scale_and_shift_of_normalised_features():
    block = film_block()
    weight, bias = torch.randn(16, 6), torch.randn(16)
    with torch.no_grad():
        block.film_projection.weight.copy_(weight)
        block.film_projection.bias.copy_(bias)
    x, emb = torch.randn(2, 8, 12, 12), torch.randn(2, 6)

    # By hand: γ, β = W·SiLU(c') + b split in halves; f' = norm2(f)·(γ + 1) + β.
    gamma_beta = functional.silu(emb) @ weight.T + bias
    gamma, beta = gamma_beta[:, :8, None, None], gamma_beta[:, 8:, None, None]
    features = block.conv1(functional.silu(block.norm1(x)))
    modulated = block.norm2(features) * (gamma + 1.0) + beta
    expected = x + block.conv2(functional.silu(modulated))

    torch.testing.assert_close(block(x, emb), expected)
    assert not torch.allclose(expected, x + block.conv2(functional.silu(block.norm2(features))))


def test_zero_film_projection_is_a_plain_unconditioned_block():
    block = film_block()
    assert not block.film_projection.weight.any() and not block.film_projection.bias.any()
    plain = DiffusionUNetResnetBlock(2, 8, temb_channels=6, out_channels=8, norm_num_groups=4)
    plain.load_state_dict(block.state_dict(), strict=False)  # all but the projections
    with torch.no_grad():
        plain.time_emb_proj.weight.zero_()
        plain.time_emb_proj.bias.zero_()
    x = torch.randn(2, 8, 12, 12)
    out_a, out_b = block(x, torch.randn(2, 6)), block(x, torch.randn(2, 6))
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(out_a, plain(x, torch.randn(2, 6)))


def test_every_unet_residual_block_is_a_film_block(model):
    resnets = [m for m in model.unet.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    assert resnets and all(isinstance(m, FiLMResnetBlock) for m in resnets)
    assert all(m.film_projection.in_features == 2 * SMALL.context_dim for m in resnets)


def test_context_from_the_input_changes_the_output(model, ixi_training_slices):
    slices = ixi_training_slices[0][:4]
    other = slices.flip(0)  # other images for the same noised inputs
    timesteps = torch.full((4,), 500)
    noise = torch.randn(slices.shape, generator=torch.Generator().manual_seed(0))
    noised = model.scheduler.add_noise(slices * 2 - 1, noise, timesteps)
    with torch.no_grad():
        context, other_context = model.encode(slices), model.encode(other)
        assert context.shape == (4, SMALL.context_dim)
        own = model.unet(noised, timesteps, context)
        swapped = model.unet(noised, timesteps, other_context)
        torch.testing.assert_close(own, model.denoise(noised, timesteps, slices))
    assert (own - swapped).abs().mean() > 1e-3


def test_untrained_model_is_defined_and_reconstructions_are_seeded(ixi_training_slices):
    slices = ixi_training_slices[0][:3]
    torch.manual_seed(0)
    fresh = CDDPM(SMALL).eval()
    out = fresh.reconstruct(slices, generator=torch.Generator().manual_seed(0))
    assert out.shape == slices.shape
    torch.testing.assert_close(out, torch.full_like(out, 0.5))  # zero-initialised output layer

    randomise_zero_parameters(fresh)
    first = fresh.reconstruct(slices, t=[250, 500], generator=torch.Generator().manual_seed(3))
    again = fresh.reconstruct(slices, t=[250, 500], generator=torch.Generator().manual_seed(3))
    other = fresh.reconstruct(slices, t=[250, 500], generator=torch.Generator().manual_seed(4))
    assert first.shape == slices.shape and torch.isfinite(first).all()
    assert first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def evaluation_loss(model, slices, brain):
    with torch.no_grad():
        return float(model.training_loss(slices, brain, generator=torch.Generator().manual_seed(123)))


def train(model, slices, brain, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model.training_loss(slices, brain, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def every_other(ixi_training_slices):
    """8 of the 16 slices, 4 from each subject: enough to learn from, half the CPU time."""
    slices, brain = ixi_training_slices
    return slices[::2], brain[::2]


def test_cddpm_learns_on_real_healthy_slices(ixi_training_slices):
    slices, brain = every_other(ixi_training_slices)
    torch.manual_seed(0)
    model = CDDPM(SMALL).train()
    before = evaluation_loss(model, slices, brain)
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    train(model, slices, brain, steps=12)
    after = evaluation_loss(model, slices, brain)
    assert after < 0.5 * before, (before, after)
    # The encoder is trained with the U-Net (the context is learnt, not fixed).
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))


def test_cddpm_trains_with_ipm_masking(ixi_training_slices):
    pytest.importorskip("napari_brain_uad.models.masking")
    slices, brain = every_other(ixi_training_slices)
    torch.manual_seed(0)
    model = CDDPM(SMALL.replace(masking="ipm")).train()
    before = evaluation_loss(model, slices, brain)
    train(model, slices, brain, steps=8)
    after = evaluation_loss(model, slices, brain)
    assert torch.isfinite(torch.tensor(after)) and after < before, (before, after)


def test_checkpoint_round_trip_gives_identical_reconstructions(model, ixi_training_slices, tmp_path):
    slices = ixi_training_slices[0][:4]
    path = save_model(tmp_path / "cddpm.safetensors", model, {"training_data": "test"})
    loaded, metadata = load_model(path)
    assert metadata["kind"] == "cddpm" and metadata["hyperparameters"]["context_dim"] == 32
    assert type(loaded) is CDDPM and loaded.config == SMALL
    torch.testing.assert_close(
        loaded.reconstruct(slices, generator=torch.Generator().manual_seed(5)),
        model.reconstruct(slices, generator=torch.Generator().manual_seed(5)),
        rtol=0,
        atol=0,
    )


def test_checkpoint_without_encoder_weights_is_refused(model, tmp_path):
    state = {name: value for name, value in model.state_dict().items() if not name.startswith("encoder.")}
    path = save_checkpoint(tmp_path / "no-encoder.safetensors", state, model.metadata())
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


def test_config_round_trips_and_is_registered():
    assert MODEL_KINDS["cddpm"] is CDDPM
    assert CDDPMConfig.from_dict(SMALL.to_dict()) == SMALL
    assert build_model("cddpm", SMALL.to_dict()).config == SMALL
    assert CDDPMConfig().context_dim == 128  # the paper's d
    with pytest.raises(ValueError, match="encoder_block"):
        CDDPMConfig(encoder_block="dense")
    with pytest.raises(ValueError, match="four"):
        CDDPMConfig(encoder_layers=(1, 1, 1))
