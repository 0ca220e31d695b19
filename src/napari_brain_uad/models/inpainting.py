"""PHANES's stage (c), the inpainting GAN: AOT-GAN's networks and the random ellipses it learns to fill.

The networks are AOT-GAN's (Zeng et al., "Aggregated contextual transformations for
high-resolution image inpainting"): the generator, AOT blocks between a strided encoder and an
up-sampling decoder, and a spectral-norm PatchGAN discriminator. The random ellipses are the
masks PHANES's code adds to its anomaly masks when it trains the GAN.

How PHANES trains and uses these (the anomaly mask, the losses, the composite) is in
``models.phanes``, whose docstring gives the widths and the paper's settings. The networks'
attribute names are part of PHANES's checkpoints: renaming one breaks loading saved models.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..noise import gaussian_noise
from .base import random_uniform

__all__ = ["AOTBlock", "InpaintingGenerator", "PatchDiscriminator", "gate_normalise", "random_ellipses",
           "rasterise_ellipses"]


def gate_normalise(gate: torch.Tensor) -> torch.Tensor:
    """AOT-GAN's normalisation of its gate before the sigmoid: 5·(2·(g − mean)/std − 1), mean
    and (unbiased) standard deviation over each feature map's pixels."""
    mean = gate.mean((2, 3), keepdim=True)
    std = gate.std((2, 3), keepdim=True) + 1e-9
    return 5 * (2 * (gate - mean) / std - 1)


class AOTBlock(nn.Module):
    """Aggregated contextual transformations: ``len(rates)`` 3×3 branches of dim/len(rates)
    channels with dilations ``rates`` (reflection-padded, ReLU), concatenated and fused by a 3×3
    convolution; a gate g = sigmoid(gate_normalise(conv(x))) mixes them with the input:
    x·(1 − g) + fused·g."""

    def __init__(self, dim: int, rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        branch = dim // len(rates)
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.ReflectionPad2d(rate), nn.Conv2d(dim, branch, 3, dilation=rate), nn.ReLU())
            for rate in self.rates
        )
        self.fuse = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(branch * len(rates), dim, 3))
        self.gate = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        gate = torch.sigmoid(gate_normalise(self.gate(x)))
        return x * (1 - gate) + fused * gate


class _UpConv(nn.Sequential):
    """Bilinear ×2 up-sampling, then a 3×3 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1))


class InpaintingGenerator(nn.Module):
    """AOT-GAN's generator: (masked slice, mask) → a whole slice in (−1, 1) (tanh)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), blocks: int = 4, rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        c0, c1, c2 = channels
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(2, c0, 7), nn.ReLU(),
            nn.Conv2d(c0, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        )
        self.middle = nn.Sequential(*[AOTBlock(c2, rates) for _ in range(blocks)])
        self.decoder = nn.Sequential(_UpConv(c2, c1), nn.ReLU(), _UpConv(c1, c0), nn.ReLU(),
                                     nn.Conv2d(c0, 1, 3, padding=1))
        _init_normal(self)

    def forward(self, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(self.middle(self.encoder(torch.cat([masked, mask], dim=1)))))


class PatchDiscriminator(nn.Module):
    """Spectral-norm PatchGAN: 4×4 convolutions of ``channels`` (stride 2 except the last),
    LeakyReLU 0.2, and a plain 4×4 convolution to one value per patch."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        layers, previous = [], 1
        for index, width in enumerate(channels):
            stride = 2 if index < len(channels) - 1 else 1
            # Initialised before the spectral norm, whose power iteration starts from the weights.
            conv = nn.Conv2d(previous, width, 4, stride=stride, padding=1, bias=False)
            _init_normal(conv)
            layers += [spectral_norm(conv), nn.LeakyReLU(0.2)]
            previous = width
        last = nn.Conv2d(previous, 1, 4, stride=1, padding=1)
        _init_normal(last)
        layers.append(last)
        self.conv = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def _init_normal(module: nn.Module) -> None:
    """AOT-GAN's initialisation: convolution weights N(0, 0.02), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- training masks


def random_ellipses(batch: int, size: tuple[int, int], count: int, axis_mean: float, axis_std: float,
                    axis_min: float, generator=None, device="cpu") -> torch.Tensor:
    """``count`` random ellipses per slice, (B, count, 5): centre row, centre column, the two
    semi-axes and the angle. Centres are uniform in the middle half of the slice; semi-axes
    |N(axis_mean, axis_std)|, at least ``axis_min`` and at most a quarter of the slice's shorter
    side, so that every ellipse lies inside the slice; angles uniform in [0, π)."""
    height, width = size
    rows = random_uniform((batch, count), generator, device, 0.25 * height, 0.75 * height)
    columns = random_uniform((batch, count), generator, device, 0.25 * width, 0.75 * width)
    axes = axis_mean + axis_std * gaussian_noise((batch, count, 2), generator=generator, device=device)
    axes = axes.abs().clamp(min=axis_min, max=0.25 * min(height, width))
    angles = random_uniform((batch, count), generator, device, 0.0, math.pi)
    return torch.stack([rows, columns, axes[..., 0], axes[..., 1], angles], dim=-1)


def rasterise_ellipses(ellipses: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The union of each slice's filled ellipses as a float mask (B, 1, H, W): pixel centres
    (row i, column j) with ((u/a)² + (v/b)²) ≤ 1 in the ellipse's rotated frame."""
    height, width = size
    device, dtype = ellipses.device, ellipses.dtype
    rows = torch.arange(height, device=device, dtype=dtype).view(1, 1, height, 1)
    columns = torch.arange(width, device=device, dtype=dtype).view(1, 1, 1, width)
    centre_rows, centre_columns, a, b, angle = (ellipses[..., k, None, None] for k in range(5))
    dy, dx = rows - centre_rows, columns - centre_columns
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return inside.any(dim=1, keepdim=True).to(dtype)
