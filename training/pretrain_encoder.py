"""cDDPM's optional first step: masked pre-training of its context encoder.

Behrendt et al. pre-train the cDDPM's ResNet encoder F_enc by masked image modelling (SparK,
65 % of the patches masked) before the diffusion training, so the context vector starts out
describing an image instead of noise. This is a simplified, dense-convolution version of SparK
(:class:`MaskedEncoderPretrainer` says what differs): the encoder sees a slice with most
patches zeroed, a light decoder reconstructs the hidden patches from its four stage outputs,
and after the pre-training the decoder is discarded; only the encoder's weights go on into
``fit``'s diffusion training (``pretrain_encoder_steps`` in the run's settings).

It lives in the training module because only training uses it: the model
(``napari_brain_uad.models.cddpm``) runs without it, and the plugin never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet
from torch import nn

from napari_brain_uad.models.base import random_integers, random_uniform
from napari_brain_uad.models.cddpm import CDDPM

# Paper, sec. 4.4: "A mask-out ratio of 65% is used during pre-training."
PRETRAIN_MASK_RATIO = 0.65


def encoder_stages(encoder: ResNet, images: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps after each of the ResNet's four stages (strides 4, 8, 16, 32)."""
    h = encoder.act(encoder.bn1(encoder.conv1(images)))
    if not encoder.no_max_pool:
        h = encoder.maxpool(h)
    stages = []
    for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        h = stage(h)
        stages.append(h)
    return stages


def random_patch_mask(
    shape: tuple[int, ...], patch: int, ratio: float, generator: torch.Generator | None, device
) -> torch.Tensor:
    """(B, 1, H, W) bool, True on a random ``ratio`` of the square ``patch`` grid, per slice.

    The exact count round(ratio · patches) is masked in every slice (as MAE and SparK do), so the
    task is equally hard for every slice; at least one patch stays visible and one is masked.
    """
    batch, _, height, width = shape
    rows, columns = math.ceil(height / patch), math.ceil(width / patch)
    patches = rows * columns
    masked = min(max(round(ratio * patches), 1), patches - 1) if patches > 1 else 1
    order = random_uniform((batch, patches), generator, device).argsort(dim=1)
    grid = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    grid.scatter_(1, order[:, :masked], True)
    grid = grid.view(batch, 1, rows, columns)
    full = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return full[:, :, :height, :width]


class MaskedEncoderPretrainer(nn.Module):
    """Masked image modelling for F_enc: reconstruct the masked patches of a slice.

    Follows SparK's recipe where it is cheap: patches of the size of the encoder's coarsest
    stride (32 px) are masked, 65 % of them; the encoder's four stage outputs are "densified"
    (positions under the mask replaced by a learnt mask token per stage) and a light
    hierarchical (U-Net-like) decoder fuses them coarse to fine; the loss is the mean squared
    error on masked pixels only; afterwards the decoder is discarded. Simplified against
    SparK: the encoder runs dense convolutions on the zero-filled image instead of sparse
    convolutions, so visible features near a mask and batch-norm statistics see the zeros.
    """

    def __init__(self, encoder: ResNet, mask_ratio: float = PRETRAIN_MASK_RATIO, patch: int = 32, width: int = 64):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be between 0 and 1, not {mask_ratio}")
        if patch < 1:
            raise ValueError(f"patch must be at least 1 pixel, not {patch}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch = patch
        stages = (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)
        stage_channels = [_stage_channels(stage) for stage in stages]
        # SparK starts its mask tokens small and random; zero would make them all equal.
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(0.02 * torch.randn(1, channels, 1, 1)) for channels in stage_channels]
        )
        self.lateral = nn.ModuleList([nn.Conv2d(channels, width, kernel_size=1) for channels in stage_channels])
        self.fuse = nn.ModuleList([_conv_block(width, width) for _ in stage_channels])
        # From stride 4 to full resolution: two more upsamplings.
        self.head = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"),
            _conv_block(width, width // 2),
            nn.Upsample(scale_factor=2.0, mode="nearest"),
            _conv_block(width // 2, width // 4),
            nn.Conv2d(width // 4, 1, kernel_size=1),
        )

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [-1, 1] predicted from their visible parts (``mask`` True = hidden)."""
        stages = encoder_stages(self.encoder, images.masked_fill(mask, 0.0))
        decoded = None
        for index in reversed(range(len(stages))):
            features = stages[index]
            hidden = nn.functional.interpolate(mask.float(), size=features.shape[-2:], mode="nearest") > 0.5
            features = torch.where(hidden, self.mask_tokens[index].to(features.dtype), features)
            lateral = self.lateral[index](features)
            if decoded is not None:
                lateral = lateral + nn.functional.interpolate(decoded, size=lateral.shape[-2:], mode="nearest")
            decoded = self.fuse[index](lateral)
        prediction = self.head(decoded)
        return nn.functional.interpolate(prediction, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, slices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error on the masked pixels of slices (B, 1, H, W) in [0, 1]; the masks
        come from ``generator``, so a seeded generator gives the same loss for the same weights."""
        images = slices * 2.0 - 1.0
        mask = random_patch_mask(tuple(slices.shape), self.patch, self.mask_ratio, generator, slices.device)
        squared = (self(images, mask) - images) ** 2
        return squared[mask.expand_as(squared)].mean()


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage: its last block's last convolution (conv3 in a
    bottleneck block, conv2 in a basic one)."""
    last = stage[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def _conv_block(in_channels: int, out_channels: int) -> Convolution:
    return Convolution(2, in_channels, out_channels, kernel_size=3, act="relu", norm="batch")


def encoder_stride(encoder: ResNet) -> int:
    """Total down-sampling of the encoder's last stage: SparK's mask patch size."""
    stem = encoder.conv1.stride[0] * (1 if encoder.no_max_pool else 2)
    return stem * 8  # layers 2, 3 and 4 halve the resolution each


def pretrain_encoder_masked(
    model: CDDPM | ResNet,
    batches: torch.Tensor | Iterable[torch.Tensor],
    *,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    mask_ratio: float = PRETRAIN_MASK_RATIO,
    patch: int | None = None,
    generator: torch.Generator | None = None,
    pretrainer: MaskedEncoderPretrainer | None = None,
) -> list[float]:
    """Pre-train the cDDPM's encoder by masked patch reconstruction (paper sec. 3.3); returns
    the loss of each step.

    ``batches`` is a tensor of healthy slices (N, 1, H, W) in [0, 1] - every step then draws
    ``batch_size`` of them with replacement (as the main training does) and ``steps`` is
    required - or an iterable of such batches, one step each (at most ``steps``). Adam with the
    paper's learning rate 1e-4; the decoder is built here and discarded afterwards unless a
    ``pretrainer`` is passed in (to go on training it, or to measure it).
    """
    encoder = model.encoder if isinstance(model, CDDPM) else model
    device = next(encoder.parameters()).device
    if pretrainer is None:
        pretrainer = MaskedEncoderPretrainer(encoder, mask_ratio, patch or encoder_stride(encoder))
    elif pretrainer.encoder is not encoder:
        raise ValueError("the pretrainer was built for another encoder")
    pretrainer.to(device)
    if isinstance(batches, torch.Tensor):
        if steps is None:
            raise ValueError("steps is needed when the slices come as one tensor")
        pool = batches

        def draw():
            for _ in range(steps):
                yield pool[random_integers(0, pool.shape[0], (min(batch_size, pool.shape[0]),), generator, "cpu")]

        batches = draw()
    optimiser = torch.optim.Adam(pretrainer.parameters(), lr=lr)
    # The pretrainer's train() reaches the encoder too; give the encoder back in its own mode.
    encoder_was_training = encoder.training
    pretrainer.train()
    losses = []
    try:
        for step, batch in enumerate(batches):
            if steps is not None and step >= steps:
                break
            loss = pretrainer.loss(batch.to(device), generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    finally:
        encoder.train(encoder_was_training)
    return losses
