"""ADDP's denoising pre-training: the noise formula by hand, which parameters each variant
trains (decoder only or encoder and decoder) for SADM, the AE and the DAE, a falling loss on
real slices, and the option through a training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional

from conftest import HALF_SPEC, SMALL_UNET, seeded

from brain_uad_training.config import ConfigError, TrainingConfig
from brain_uad_training.fit import fit
from brain_uad_training.pretrain_denoise import (
    ADDP_NOISE_SIGMA,
    denoising_loss,
    noised_input,
    pretrain_denoising,
)
from napari_brain_uad.models import build_model
from napari_brain_uad.models.autoencoders import monai_unet_part

SMALL_SADM = {"channels": [8, 16, 32], "norm_num_groups": 4, "base_kind": "dae", "base_hyperparameters": SMALL_UNET}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def half(slices):
    return functional.avg_pool2d(slices, 2)


def test_noised_input_is_the_papers_formula_by_hand():
    x = torch.tensor([0.5, 0.0, 1.0])
    noise = torch.tensor([1.0, -2.0, 0.25])
    expected = torch.tensor([(0.5 + 0.4) / math.sqrt(1.16), (0.0 - 0.8) / math.sqrt(1.16), (1.0 + 0.1) / math.sqrt(1.16)])
    torch.testing.assert_close(noised_input(x, noise), expected)
    assert ADDP_NOISE_SIGMA == 0.4


def test_the_loss_is_zero_for_a_perfect_noise_predictor():
    x = torch.rand(2, 1, 8, 8)
    # x_σ·√(1 + σ²) − x = σ·ε, so this predictor recovers ε exactly.
    perfect = lambda noised: (noised * math.sqrt(1 + 0.4**2) - x) / 0.4  # noqa: E731
    assert float(denoising_loss(perfect, x, seeded(0))) < 1e-10
    assert float(denoising_loss(lambda noised: torch.zeros_like(noised), x, seeded(0))) == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize("kind, hyperparameters", [
    ("sadm", SMALL_SADM),
    ("dae", SMALL_UNET),
    ("ae", {"channels": [8, 16], "strides": [2, 2]}),
])
@pytest.mark.parametrize("mode", ["denoise-decoder", "denoise-encoder-decoder"])
def test_each_variant_trains_the_parts_it_names(kind, hyperparameters, mode, ixi_training_slices):
    slices = half(ixi_training_slices[0])
    torch.manual_seed(0)
    model = build_model(kind, hyperparameters, HALF_SPEC)
    parts = model.denoising_parts()
    assert parts.encoder and parts.decoder
    assert not {id(p) for p in parts.encoder} & {id(p) for p in parts.decoder}
    encoder_before = [p.detach().clone() for p in parts.encoder]
    decoder_before = [p.detach().clone() for p in parts.decoder]
    frozen_elsewhere = [p.detach().clone() for p in model.base.parameters()] if kind == "sadm" else []
    pretrain_denoising(model, [slices[:4], slices[4:8]], mode=mode, learning_rate=1e-3, generator=seeded(1))
    encoder_changed = any(not torch.equal(p, q) for p, q in zip(parts.encoder, encoder_before))
    decoder_changed = any(not torch.equal(p, q) for p, q in zip(parts.decoder, decoder_before))
    assert decoder_changed
    assert encoder_changed == (mode == "denoise-encoder-decoder")
    assert all(p.requires_grad for p in parts.encoder)  # trainable again for the fine-tuning
    if kind == "sadm":  # the frozen base model is never touched
        assert all(torch.equal(p, q) for p, q in zip(model.base.parameters(), frozen_elsewhere))


def test_the_dae_split_follows_monai_unet_nesting():
    assert monai_unet_part("model.0.conv.unit0.conv.weight") == "encoder"
    assert monai_unet_part("model.1.submodule.0.conv.unit0.conv.weight") == "encoder"
    assert monai_unet_part("model.1.submodule.1.submodule.conv.unit0.conv.weight") == "encoder"  # the bottom
    assert monai_unet_part("model.1.submodule.2.0.conv.weight") == "decoder"
    assert monai_unet_part("model.2.1.conv.unit0.conv.weight") == "decoder"
    model = build_model("dae")
    parts = model.denoising_parts()
    assert sum(p.numel() for p in parts.encoder) + sum(p.numel() for p in parts.decoder) == sum(
        p.numel() for p in model.parameters())
    assert parts.encoder[0].shape[1] == 1  # the first convolution reads the slice


def test_denoising_loss_falls_on_real_slices(ixi_training_slices):
    slices = half(ixi_training_slices[0])
    torch.manual_seed(0)
    model = build_model("sadm", SMALL_SADM, HALF_SPEC)
    parts = model.denoising_parts()
    with torch.no_grad():
        before = float(denoising_loss(parts.predict_noise, slices, seeded(9)))
    batches = [slices[torch.randperm(len(slices), generator=seeded(step))[:8]] for step in range(30)]
    pretrain_denoising(model, batches, mode="denoise-encoder-decoder", learning_rate=3e-3, generator=seeded(2))
    model.eval()
    with torch.no_grad():
        after = float(denoising_loss(parts.predict_noise, slices, seeded(9)))
    assert after < 0.7 * before


def test_a_training_run_pretrains_first_and_logs_it(ixi_scans, tmp_path):
    settings = dict(data=str(tmp_path), output=str(tmp_path / "run"), kind="dae", steps=2, batch_size=4,
                    validation_slices=4, validate_every=2, augment=False,
                    model={**SMALL_UNET, "channels": [8, 16, 32, 32], "strides": [2, 2, 2]})
    with pytest.raises(ConfigError, match="pretrain_steps"):
        TrainingConfig(**settings, pretrain="denoise-decoder")
    with pytest.raises(ConfigError, match="unknown 'pretrain'"):
        TrainingConfig(**settings, pretrain="denoise-everything", pretrain_steps=3)
    with pytest.raises(ConfigError, match="no encoder-decoder"):
        TrainingConfig(**{**settings, "kind": "ddpm", "model": {}}, pretrain="denoise-decoder", pretrain_steps=3)
    fit(TrainingConfig(**settings, pretrain="denoise-encoder-decoder", pretrain_steps=3), scans=ixi_scans,
        show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["pretrain_step"] for line in lines if "pretrain_step" in line] == [1, 2, 3]
    assert any("loss" in line and line["step"] == 2 for line in lines)
