"""The autoencoder baselines (AE, VAE, DAE): what a user comparing against them relies on.

Small networks on real healthy IXI slices: reconstructions of the right shape and range that
never change between calls, the VAE objective exactly as documented, the DAE's coarse noise as in
Kascenas et al., training that lowers the loss, and checkpoints that give back the same model.
"""

from __future__ import annotations

import json

import pytest
import torch

from napari_brain_uad.models import MODEL_KINDS, build_model
from napari_brain_uad.models.autoencoders import (
    AE,
    DAE,
    VAE,
    AEConfig,
    DAEConfig,
    VAEConfig,
    coarse_gaussian_noise,
    kl_divergence,
)
from napari_brain_uad.preprocess import ModelSpaceSpec

# Small enough that the whole file trains all three kinds in seconds on two CPU threads.
SMALL = {
    "ae": {"channels": [8, 16, 32], "strides": [2, 2, 2], "latent_size": 32},
    "ae-spatial": {"channels": [8, 16, 16], "strides": [2, 2, 2], "latent": "spatial"},
    "vae": {"channels": [8, 16, 32], "strides": [2, 2, 2], "latent_size": 32},
    "dae": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm_num_groups": 4},
}
KINDS = ("ae", "ae-spatial", "vae", "dae")


def small_model(name: str, seed: int = 0):
    torch.manual_seed(seed)  # weight initialisation only
    kind = name.split("-")[0]
    return build_model(kind, SMALL[name])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_three_baselines_are_registered_and_ignore_noise_levels():
    assert MODEL_KINDS["ae"] is AE and MODEL_KINDS["vae"] is VAE and MODEL_KINDS["dae"] is DAE
    for model_class in (AE, VAE, DAE):
        assert model_class.uses_noise_level is False


@pytest.mark.parametrize("name", KINDS)
def test_reconstruction_has_the_slice_shape_stays_in_range_and_never_changes(name, ixi_training_slices):
    slices, _ = ixi_training_slices
    model = small_model(name)
    first = model.reconstruct(slices[:4])
    assert first.shape == (4, 1, 96, 96)
    assert first.dtype == torch.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    # No randomness at test time: same input, same output, whatever t or generator is passed.
    assert torch.equal(model.reconstruct(slices[:4]), first)
    assert torch.equal(model.reconstruct(slices[:4], t=500, generator=seeded(1)), first)
    # Each slice is reconstructed on its own (norms are per slice, no batch statistics).
    assert torch.allclose(model.reconstruct(slices[1:2]), first[1:2], atol=1e-5)


def test_kl_divergence_matches_the_closed_form_by_hand():
    # Two latent vectors of 3 dims. Per dim: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2).
    mu = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    first = 0.5 * (1.0 + 0.0 + 0.0) + 0.5 * (torch.e**2 - 1.0 - 2.0) + 0.5 * 4.0
    expected = (first + 0.0) / 2  # summed over dims, averaged over the batch
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0


def test_vae_loss_is_l1_plus_one_thousandth_of_the_kl(ixi_training_slices):
    slices, _ = ixi_training_slices
    model = small_model("vae")
    assert model.config.beta == 0.001
    batch = slices[:4]
    loss = model.training_loss(batch, generator=seeded(3))

    # By hand: same encoder, eps ~ N(0, I) from the same seed, z = mu + sigma * eps.
    mu, logvar = model.encode(batch)
    eps = torch.randn(mu.shape, generator=seeded(3))
    decoded = model.decode(mu + torch.exp(0.5 * logvar) * eps)
    reconstruction = (decoded - batch).abs().mean()
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(dim=1).mean()
    assert loss.item() == pytest.approx((reconstruction + 0.001 * kl).item(), rel=1e-5)

    terms = model.loss_terms(batch, generator=seeded(3))
    assert terms["reconstruction"].item() == pytest.approx(reconstruction.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    # A different draw of eps gives a different loss: the sample really is used in training.
    assert model.training_loss(batch, generator=seeded(4)).item() != loss.item()


def test_vae_reconstructs_from_the_latent_mean(ixi_training_slices):
    slices, _ = ixi_training_slices
    model = small_model("vae")
    with torch.no_grad():
        mu, _ = model.encode(slices[:2])
        assert torch.equal(model.reconstruct(slices[:2]), model.decode(mu).clamp(0, 1))


def test_coarse_noise_is_a_smooth_upsampled_grid_with_the_configured_std():
    shape = (64, 1, 96, 96)
    noise = coarse_gaussian_noise(shape, resolution=16, std=0.2, random_shift=False, generator=seeded(5))
    grid = 0.2 * torch.randn((64, 1, 16, 16), generator=seeded(5))
    # 16 nodes over 96 pixels: every 6th pixel holds a grid value exactly ...
    assert torch.allclose(noise[..., ::6, ::6], grid, atol=1e-6)
    # ... which are Gaussian with the configured std (16,384 values: ~0.6 % sampling error) ...
    assert grid.std().item() == pytest.approx(0.2, rel=0.03)
    assert abs(grid.mean().item()) < 0.01
    # ... and pixels between are bilinear blends: halfway between two nodes, their mean.
    assert torch.allclose(noise[..., 0, 3], (grid[..., 0, 0] + grid[..., 0, 1]) / 2, atol=1e-6)
    # The grid is periodic: the last cell blends back to the first node, so shifts leave no seam.
    assert torch.allclose(noise[..., 0, 93], (grid[..., 0, 15] + grid[..., 0, 0]) / 2, atol=1e-6)


def neighbour_correlation(field: torch.Tensor, dim: int) -> float:
    a = field.narrow(dim, 0, field.shape[dim] - 1).flatten()
    b = field.narrow(dim, 1, field.shape[dim] - 1).flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_shifted_coarse_noise_is_smooth_seeded_and_a_translation_of_the_grid():
    shape = (16, 1, 96, 96)
    shifted = coarse_gaussian_noise(shape, generator=seeded(6))
    assert shifted.shape == shape
    # Coarse: neighbouring pixels nearly equal, unlike white noise (correlation 0).
    assert neighbour_correlation(shifted, 2) > 0.95 and neighbour_correlation(shifted, 3) > 0.95
    white = torch.randn(shape, generator=seeded(6))
    assert abs(neighbour_correlation(white, 3)) < 0.05
    # Same seed, same field; another seed, another one.
    assert torch.equal(coarse_gaussian_noise(shape, generator=seeded(6)), shifted)
    assert not torch.allclose(coarse_gaussian_noise(shape, generator=seeded(7)), shifted)
    # The shift only translates each slice's field (circularly), by its own random offset.
    unshifted = coarse_gaussian_noise(shape, random_shift=False, generator=seeded(6))
    offsets = set()
    for index in range(shape[0]):
        # Circular cross-correlation (via FFT) peaks at the translation; then check it is exact.
        correlation = torch.fft.ifft2(torch.fft.fft2(shifted[index]) * torch.fft.fft2(unshifted[index]).conj()).real
        dy, dx = divmod(int(correlation.argmax()), 96)
        assert torch.allclose(torch.roll(unshifted[index], (dy, dx), dims=(-2, -1)), shifted[index], atol=1e-6)
        offsets.add((dy, dx))
    assert len(offsets) > 1


def test_dae_noise_goes_only_where_the_method_puts_it(ixi_training_slices):
    slices, brain = ixi_training_slices
    batch, mask = slices[:4], brain[:4]
    model = small_model("dae")
    assert (model.config.noise_resolution, model.config.noise_std) == (16, 0.2)
    noised = model.add_training_noise(batch, generator=seeded(8))
    change = noised - batch
    background = batch <= 0.01
    assert background.any() and (~background).any()
    assert torch.equal(change[background], torch.zeros_like(change[background]))
    assert change[~background].abs().mean() > 0.05
    # Seeded: the same generator seed gives the same noised input.
    assert torch.equal(model.add_training_noise(batch, generator=seeded(8)), noised)

    in_brain = DAE(DAEConfig(**{**_tuples(SMALL["dae"]), "noise_region": "brain"}))
    change = in_brain.add_training_noise(batch, mask, generator=seeded(8)) - batch
    assert torch.equal(change[~mask], torch.zeros_like(change[~mask]))
    assert change[mask].abs().mean() > 0.05
    with pytest.raises(ValueError, match="brain mask"):
        in_brain.training_loss(batch, None, generator=seeded(8))


def _tuples(values: dict) -> dict:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def evaluation_loss(model, slices, brain) -> float:
    """Training objective on fixed inputs with fixed random numbers, so that only the weights change."""
    with torch.no_grad():
        return model.training_loss(slices, brain, generator=seeded(123)).item()


# The U-Net learns to denoise much faster than the bottlenecked autoencoders learn to reconstruct.
@pytest.mark.parametrize(("name", "steps"), [("ae", 20), ("vae", 20), ("dae", 10)])
def test_a_few_adam_steps_on_real_slices_lower_the_loss(name, steps, ixi_training_slices):
    slices, brain = ixi_training_slices
    model = small_model(name)
    before = evaluation_loss(model, slices, brain)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = seeded(11)
    for _ in range(steps):
        chosen = torch.randint(0, slices.shape[0], (8,), generator=generator)
        loss = model.training_loss(slices[chosen], brain[chosen], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = evaluation_loss(model, slices, brain)
    assert after < 0.7 * before, f"{name}: loss {before:.4f} -> {after:.4f}"
    if name != "dae":  # the DAE's objective is on noised input; its reconstruction error is the AE's
        reconstruction_error = (model.reconstruct(slices) - slices).abs().mean().item()
        assert reconstruction_error < 0.8 * (small_model(name).reconstruct(slices) - slices).abs().mean().item()


@pytest.mark.parametrize("config_class", (AEConfig, VAEConfig, DAEConfig))
def test_hyperparameters_round_trip_through_json_and_refuse_unknown_names(config_class):
    config = config_class()
    assert config_class.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown"):
        config_class.from_dict({**config.to_dict(), "dropout": 0.1})


@pytest.mark.parametrize(
    ("config_class", "changes"),
    [
        (AEConfig, {"channels": (8, 16), "strides": (2, 2, 2)}),
        (AEConfig, {"channels": (), "strides": ()}),
        (AEConfig, {"strides": (2, 0, 2, 2)}),
        (AEConfig, {"latent": "sparse"}),
        (AEConfig, {"latent_size": 0}),
        (AEConfig, {"loss": "huber"}),
        (VAEConfig, {"beta": -0.001}),
        (VAEConfig, {"beta": float("nan")}),
        (VAEConfig, {"latent_size": 0}),
        (DAEConfig, {"strides": (2, 2, 2, 2)}),
        (DAEConfig, {"channels": (32,), "strides": ()}),
        (DAEConfig, {"norm_num_groups": 3}),
        (DAEConfig, {"noise_resolution": 0}),
        (DAEConfig, {"noise_std": -0.2}),
        (DAEConfig, {"noise_region": "skull"}),
        (DAEConfig, {"loss": "ssim"}),
    ],
)
def test_invalid_hyperparameters_are_refused(config_class, changes):
    with pytest.raises(ValueError):
        config_class(**changes)


@pytest.mark.parametrize("model_class", (AE, VAE, DAE))
def test_strides_must_divide_the_slice_size(model_class):
    # Default strides downsample by 16 (AE, VAE) or 8 (DAE); 100 is divisible by neither.
    with pytest.raises(ValueError, match="divide the slice size"):
        model_class(model_class.config_class(), ModelSpaceSpec(in_plane=(100, 100)))
    assert model_class(model_class.config_class(), ModelSpaceSpec(in_plane=(64, 64))).spec.in_plane == (64, 64)
