"""Reconstructing whole volumes (``reconstruct.reconstruct_volume``) with a small DDPM on MONAI:
real model-space volumes slice by slice, seeds, progress, cancel, the device, every model kind
through the same call, and the checkpoint round trip and refusals its models go through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_brain_uad.checkpoint import CheckpointError, save_checkpoint
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.models import DDPM, DDPMConfig, load_model, save_model
from napari_brain_uad.preprocess import to_model_space
from napari_brain_uad.reconstruct import Cancelled, pick_device, reconstruct_volume

SMALL = DDPMConfig(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16)


@pytest.fixture(scope="module")
def mslub_model_space():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "mslub/patient26/T1.nii.gz"
    if not path.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    return to_model_space(read_nifti(path))


@pytest.fixture
def model():
    """An untrained DDPM. MONAI zero-initialises the U-Net's last layers, so an untrained net
    maps everything to one value; random weights there make its output depend on the input and
    the noise, which is what these mechanics tests need (training is tested elsewhere)."""
    torch.manual_seed(0)
    ddpm = DDPM(SMALL)
    with torch.no_grad():
        for parameter in ddpm.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    return ddpm


def test_reconstructs_every_slice_of_a_real_volume(model, mslub_model_space):
    volume = mslub_model_space.image
    calls = []
    out = reconstruct_volume(model, volume, samples=2, seed=1, batch_size=32, device="cpu",
                             progress=lambda done, total: calls.append((done, total)))
    assert out.shape == (2, *volume.shape) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    total = 2 * volume.shape[2]
    assert calls[-1] == (total, total) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert not np.array_equal(out[0], out[1])  # fresh noise per sample
    again = reconstruct_volume(model, volume, samples=2, seed=1, batch_size=32, device="cpu")
    np.testing.assert_array_equal(out, again)  # a seed gives the same reconstructions


def test_cancel_stops_before_the_next_batch(model, mslub_model_space):
    calls = []
    with pytest.raises(Cancelled):
        reconstruct_volume(model, mslub_model_space.image, batch_size=8, device="cpu",
                           progress=lambda done, total: calls.append(done), cancelled=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_checkpoint_round_trip_gives_the_same_reconstruction(model, mslub_model_space, tmp_path):
    path = save_model(tmp_path / "ddpm.safetensors", model, {"training_data": "test"})
    loaded, metadata = load_model(path)
    assert metadata["kind"] == "ddpm" and metadata["hyperparameters"]["channels"] == [16, 32, 32]
    assert loaded.config == model.config
    volume = mslub_model_space.image[:, :, 20:24]
    np.testing.assert_array_equal(
        reconstruct_volume(model, volume, seed=3, device="cpu"), reconstruct_volume(loaded, volume, seed=3, device="cpu")
    )


def test_weights_that_do_not_fit_are_refused(model, tmp_path):
    other = DDPM(DDPMConfig(channels=(16, 32, 64), norm_num_groups=8, num_head_channels=16))
    path = save_checkpoint(tmp_path / "bad.safetensors", other.state_dict(), model.metadata())
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


def test_unknown_kind_and_bad_hyperparameters_are_refused(model, tmp_path):
    path = save_checkpoint(tmp_path / "k.safetensors", model.state_dict(), {**model.metadata(), "kind": "gan"})
    with pytest.raises(CheckpointError, match="unknown model kind 'gan'"):
        load_model(path)
    bad = {**model.metadata(), "hyperparameters": {**SMALL.to_dict(), "t_test": 5000}}
    path = save_checkpoint(tmp_path / "h.safetensors", model.state_dict(), bad)
    with pytest.raises(CheckpointError, match="t_test"):
        load_model(path)


def test_auto_device_is_the_cpu_here():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto").type == expected


def test_simplex_noise_ddpm_reconstructs(mslub_model_space):
    torch.manual_seed(0)
    ddpm = DDPM(DDPMConfig(**{**SMALL.to_dict(), "noise": "simplex"}))
    volume = mslub_model_space.image[:, :, 30:34]
    out = reconstruct_volume(ddpm, volume, samples=2, seed=0, device="cpu")
    assert out.shape == (2, *volume.shape) and np.isfinite(out).all()


def neighbour_correlation(fields: torch.Tensor) -> float:
    """Pearson correlation of horizontally adjacent pixels, pooled over all fields."""
    left, right = fields[..., :-1].reshape(-1).double(), fields[..., 1:].reshape(-1).double()
    return float(torch.corrcoef(torch.stack((left, right)))[0, 1])


@pytest.mark.parametrize("noise", ["simplex", "gaussian"])
def test_a_ddpm_noises_its_input_with_the_noise_it_is_set_to(noise):
    """The U-Net sees the slices noised with the configured noise, in training and in
    reconstruction. The noise is taken back out of what the U-Net reads,
    ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), for slices of white noise (so nothing smooth comes from the
    slices): simplex noise (AnoDDPM) is smooth, neighbouring pixels correlating (about 0.9), where
    Gaussian noise is white (about 0)."""
    torch.manual_seed(0)
    ddpm = DDPM(DDPMConfig(**{**SMALL.to_dict(), "noise": noise}))
    slices = torch.rand((4, 1, 64, 64), generator=torch.Generator().manual_seed(1))
    unet_inputs = []
    ddpm.unet.register_forward_pre_hook(lambda unet, arguments: unet_inputs.append(arguments[:2]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ddpm.training_loss(slices, generator=generator)
    ddpm.reconstruct(slices, t=500, generator=generator)
    assert len(unet_inputs) == 2
    for noised, timesteps in unet_inputs:
        signal = ddpm.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        added = (noised - signal.sqrt() * (slices * 2.0 - 1.0)) / (1.0 - signal).sqrt()
        with_slices = torch.corrcoef(torch.stack((added.reshape(-1), slices.reshape(-1))).double())[0, 1]
        assert added.std() > 0.1 and abs(float(with_slices)) < 0.05  # the noise is left, not the slices
        if noise == "simplex":
            assert neighbour_correlation(added) > 0.6
        else:
            assert abs(neighbour_correlation(added)) < 0.05


def test_a_noise_level_ensemble_is_the_mean_of_its_levels(model, ixi_training_slices):
    """The thesis averages reconstructions at t = 250, 500 and 750; each level draws fresh noise."""
    slices = ixi_training_slices[0][:4]
    generator = torch.Generator().manual_seed(5)
    ensemble = model.reconstruct(slices, t=[250, 500, 750], generator=generator)
    generator.manual_seed(5)
    levels = [model.reconstruct(slices, t=level, generator=generator) for level in (250, 500, 750)]
    torch.testing.assert_close(ensemble, torch.stack(levels).mean(dim=0))
    assert not torch.equal(levels[0], levels[2])  # the levels differ, so the mean is not trivial
    with pytest.raises(ValueError, match="noise level"):
        model.reconstruct(slices, t=[500, 1000])


def test_every_kind_reconstructs_a_volume_through_the_same_door(ixi_training_slices):
    """reconstruct_volume takes any registered kind; kinds without noise levels ignore t."""
    from napari_brain_uad.models import MODEL_KINDS, build_model

    small = {
        "ddpm": SMALL.to_dict(), "pddpm": SMALL.to_dict(), "cddpm": SMALL.to_dict(),
        "ae": {"channels": [8, 16, 16, 32], "latent_size": 16},
        "vae": {"channels": [8, 16, 16, 32], "latent_size": 16},
        "dae": {"channels": [8, 16, 16, 32], "num_res_units": 1},
        "vae3d": {"channels": [4, 8, 8, 8], "latent_size": 16},
        "sadm": {"channels": [8, 16, 32], "norm_num_groups": 4, "base_kind": "dae",
                 "base_hyperparameters": {"channels": [8, 16, 16, 32], "num_res_units": 1}},
        "maediff": {**SMALL.to_dict(), "mae_encoder_width": 32, "mae_encoder_heads": 2, "mae_decoder_width": 32,
                    "mae_decoder_heads": 2},
        "phanes": {"channels": [8, 16, 16, 32], "latent_size": 16, "generator_channels": [8, 8, 16], "aot_blocks": 1,
                   "discriminator_channels": [8, 8, 8, 8]},
    }
    volume = np.moveaxis(ixi_training_slices[0][:6, 0].numpy(), 0, -1)  # (96, 96, 6)
    for kind, model_class in MODEL_KINDS.items():
        model = build_model(kind, small[kind])
        out = reconstruct_volume(model, volume, samples=2, t=[250, 500], seed=0, device="cpu")
        assert out.shape == (2, *volume.shape) and np.isfinite(out).all(), kind
        assert model.uses_noise_level == (kind.endswith("ddpm") or kind == "maediff"), kind
