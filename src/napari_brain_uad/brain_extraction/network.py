"""deepbet's network, a 3D LinkNet, defined here so its shipped weights load into plain PyTorch.

LinkNet (Chaurasia & Culurciello 2017) in 3D as deepbet uses it: a 7³ stride-2 convolution and
max-pooling, four encoder stages of two residual blocks (16, 32, 64, 128 channels; strides 1,
2, 2, 2), four decoder stages (1×1×1 convolution to a quarter of the channels, 3³ transposed
convolution, 1×1×1 convolution) each added to the encoder output of its size, and a head of
transposed convolutions back to the input size with two output channels (background, brain),
softmax. Every convolution is followed by instance normalisation without learnt parameters, and
by a ReLU except where a residual is added. The layout was read off the names and shapes of the
tensors in deepbet 1.0.2's archives; the attribute names below are those names, so the archive's
state dict loads with ``strict=True``. A test checks the network against the archive's shapes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return functional.instance_norm(x, eps=1e-5)


def _convolution(channels_in: int, channels_out: int, size: int, stride: int, padding: int) -> nn.Conv3d:
    return nn.Conv3d(channels_in, channels_out, size, stride, padding, bias=False)


class ResidualBlock(nn.Module):
    """Two 3³ convolutions, added to the input (through a strided 1³ convolution when the size or
    the channels change)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.double_conv = nn.ModuleDict({"0": _convolution(channels_in, channels_out, 3, stride, 1),
                                          "3": _convolution(channels_out, channels_out, 3, 1, 1)})
        changes = stride != 1 or channels_in != channels_out
        self.downsample = nn.ModuleDict({"0": _convolution(channels_in, channels_out, 1, stride, 0)}) if changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.relu(_normalised(self.double_conv["0"](x)))
        y = _normalised(self.double_conv["3"](y))
        shortcut = x if self.downsample is None else _normalised(self.downsample["0"](x))
        return functional.relu(y + shortcut)


class EncoderStage(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.block1 = ResidualBlock(channels_in, channels_out, stride)
        self.block2 = ResidualBlock(channels_out, channels_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class DecoderStage(nn.Module):
    """1³ convolution to a quarter of the channels, 3³ transposed convolution, 1³ convolution."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, output_padding: int):
        super().__init__()
        middle = channels_in // 4
        self.conv1 = nn.ModuleDict({"0": _convolution(channels_in, middle, 1, 1, 0)})
        self.tp_conv = nn.ModuleDict({"0": nn.ConvTranspose3d(middle, middle, 3, stride, 1, output_padding,
                                                              bias=False)})
        self.conv2 = nn.ModuleDict({"0": _convolution(middle, channels_out, 1, 1, 0)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.relu(_normalised(self.conv1["0"](x)))
        x = functional.relu(_normalised(self.tp_conv["0"](x)))
        return functional.relu(_normalised(self.conv2["0"](x)))


class LinkNet3d(nn.Module):
    """Input (B, 1, D, H, W) with sides divisible by 32; output (B, 2, D, H, W): background and
    brain probabilities."""

    def __init__(self):
        super().__init__()
        self.init = nn.ModuleDict({"0": _convolution(1, 16, 7, 2, 3)})
        self.down0 = EncoderStage(16, 16, 1)
        self.down1 = EncoderStage(16, 32, 2)
        self.down2 = EncoderStage(32, 64, 2)
        self.down3 = EncoderStage(64, 128, 2)
        self.up0 = DecoderStage(128, 64, 2, 1)
        self.up1 = DecoderStage(64, 32, 2, 1)
        self.up2 = DecoderStage(32, 16, 2, 1)
        self.up3 = DecoderStage(16, 16, 1, 0)
        self.tp_conv1 = nn.ModuleDict({"0": nn.ConvTranspose3d(16, 8, 3, 2, 1, 1, bias=True)})
        self.conv = nn.ModuleDict({"0": nn.Conv3d(8, 8, 3, 1, 1, bias=True)})
        self.tp_conv2 = nn.ConvTranspose3d(8, 2, 2, 2, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = functional.max_pool3d(functional.relu(_normalised(self.init["0"](x))), 3, 2, 1)
        level0 = self.down0(stem)
        level1 = self.down1(level0)
        level2 = self.down2(level1)
        level3 = self.down3(level2)
        up = self.up0(level3) + level2
        up = self.up1(up) + level1
        up = self.up2(up) + level0
        up = self.up3(up) + stem
        up = functional.relu(_normalised(self.tp_conv1["0"](up)))
        up = functional.relu(_normalised(self.conv["0"](up)))
        return torch.softmax(self.tp_conv2(up), dim=1)
