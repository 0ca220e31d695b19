"""cDDPM's masked pre-training of its context encoder (training's ``pretrain_encoder``): the mask
hides what it is asked to, and a few steps on real healthy slices lower the loss."""

from __future__ import annotations

import pytest
import torch

from brain_uad_training.pretrain_encoder import (
    MaskedEncoderPretrainer,
    encoder_stride,
    pretrain_encoder_masked,
    random_patch_mask,
)
from napari_brain_uad.models import CDDPM

from conftest import SMALL_CDDPM as SMALL


def test_patch_mask_hides_the_asked_fraction_of_patches():
    mask = random_patch_mask((5, 1, 96, 96), 32, 0.65, torch.Generator().manual_seed(0), "cpu")
    assert mask.shape == (5, 1, 96, 96)
    # 9 patches of 32 px; round(0.65 · 9) = 6 masked in every slice.
    assert mask.sum(dim=(1, 2, 3)).tolist() == [6 * 32 * 32] * 5
    assert not torch.equal(mask[0], mask[1])


def test_masked_pretraining_lowers_its_loss(ixi_training_slices):
    slices = ixi_training_slices[0][::2]  # 8 of the 16 slices: enough to learn from, half the time
    torch.manual_seed(0)
    model = CDDPM(SMALL).eval()
    pretrainer = MaskedEncoderPretrainer(model.encoder, patch=encoder_stride(model.encoder))
    assert pretrainer.patch == 32

    def measured():
        pretrainer.train()  # batch statistics, as in the steps
        with torch.no_grad():
            return float(pretrainer.loss(slices, torch.Generator().manual_seed(9)))

    before = measured()
    model.eval()
    losses = pretrain_encoder_masked(
        model, slices, steps=15, batch_size=8, lr=1e-3,
        generator=torch.Generator().manual_seed(0), pretrainer=pretrainer,
    )
    assert not model.encoder.training  # given back in the mode it came in
    after = measured()
    assert len(losses) == 15 and all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.7 * before, (before, after)


def test_slices_in_one_tensor_need_a_step_count_and_a_pretrainer_its_own_encoder():
    torch.manual_seed(0)
    model, other = CDDPM(SMALL), CDDPM(SMALL)
    slices = torch.rand(4, 1, 96, 96)
    with pytest.raises(ValueError, match="steps"):
        pretrain_encoder_masked(model, slices)
    with pytest.raises(ValueError, match="another encoder"):
        pretrain_encoder_masked(model, slices, steps=1, pretrainer=MaskedEncoderPretrainer(other.encoder))
