"""DDPM (AnoDDPM-style) on MONAI: one-step reconstruction from noise level ``t_test``.

The papers' reconstruction is one step: noise a slice to level ``t_test`` (500 of T = 1000),
and let the network predict the clean slice x0 directly (trained with an L1 loss on x0). The
network is MONAI's ``DiffusionModelUNet``; the noise schedule is MONAI's ``DDPMScheduler``
(linear β from 1e-4 to 2e-2). Inputs are model-space slices in [0, 1]; the network works in
[-1, 1] as in the papers. Noise is Gaussian or simplex (AnoDDPM). Several noise levels at once
(the thesis's ensemble over 250, 500 and 750) give the mean of their reconstructions.

mDDPM's training-time masking (IPM, FPM, FPM-CutMix; see ``masking.py``) is an option of every
DDPM variant: the network sees the masked, noised slice and must return the clean one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from ..noise import gaussian_noise, simplex_noise_2d
from ..preprocess import ModelSpaceSpec
from .base import ModelConfig, ReconstructionModel, random_integers

MASKING_STRATEGIES = ("none", "ipm", "fpm", "fpm-cutmix")


@dataclass(frozen=True)
class DDPMConfig(ModelConfig):
    """Hyper-parameters of a DDPM; stored in the checkpoint and enough to rebuild the network."""

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 16
    num_head_channels: int = 32
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    noise: str = "simplex"  # AnoDDPM simplex noise, as every DDPM of the thesis; or "gaussian"
    t_test: int = 500
    # mDDPM training-time masking; the fraction of the brain masked is drawn per slice.
    masking: str = "none"
    masking_ratio: tuple[float, float] = (0.1, 0.9)
    masking_patch: int = 8

    def __post_init__(self):
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per U-Net level")
        if any(channels % self.norm_num_groups for channels in self.channels):
            raise ValueError(f"every entry of channels must be a multiple of norm_num_groups ({self.norm_num_groups})")
        if self.noise not in ("gaussian", "simplex"):
            raise ValueError(f"noise must be 'gaussian' or 'simplex', not {self.noise!r}")
        if not 0 < self.t_test < self.timesteps:
            raise ValueError(f"t_test must be between 1 and {self.timesteps - 1}, not {self.t_test}")
        if self.masking not in MASKING_STRATEGIES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_STRATEGIES)}, not {self.masking!r}")
        low, high = self.masking_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"masking_ratio must be (low, high) with 0 <= low <= high <= 1, not {self.masking_ratio}")
        if self.masking_patch < 1:
            raise ValueError(f"masking_patch must be at least 1 pixel, not {self.masking_patch}")


class DDPM(ReconstructionModel):
    """A U-Net that predicts the clean slice x0 from a noised one, with its noise schedule."""

    kind = "ddpm"
    config_class = DDPMConfig
    uses_noise_level = True
    samples_differ = True

    def __init__(self, config: DDPMConfig = DDPMConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        self.unet = self.build_unet(config)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.timesteps,
            schedule="linear_beta",
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            prediction_type="sample",
        )

    @staticmethod
    def build_unet(config: DDPMConfig) -> torch.nn.Module:
        return DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
        )

    def draw_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.noise == "simplex":
            return simplex_noise_2d(tuple(like.shape), generator=generator, device=like.device, dtype=like.dtype)
        return gaussian_noise(tuple(like.shape), generator=generator, device=like.device, dtype=like.dtype)

    def forward(self, slices: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 predicted from ``slices`` (B, 1, H, W) in [0, 1] noised to ``timesteps``; in [0, 1]."""
        clean = slices * 2.0 - 1.0
        noised = self.scheduler.add_noise(clean, noise, timesteps)
        return (self.denoise(noised, timesteps, slices) + 1.0) / 2.0

    def denoise(self, noised: torch.Tensor, timesteps: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """The network's x0 in [-1, 1] from noised input in [-1, 1]. ``slices`` (the un-noised
        input in [0, 1]) is there for conditioned variants; the plain DDPM does not look at it."""
        return self.unet(noised, timesteps)

    def mask_for_training(
        self, slices: torch.Tensor, brain_mask: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """mDDPM's masked input, or ``slices`` unchanged when masking is off."""
        if self.config.masking == "none":
            return slices
        from .masking import apply_masking

        return apply_masking(
            slices,
            brain_mask,
            self.config.masking,
            ratio=self.config.masking_ratio,
            patch=self.config.masking_patch,
            generator=generator,
        )

    def training_loss(self, slices, brain_mask=None, generator=None):
        """L1 between the clean slices and the x0 predicted at a uniformly drawn noise level."""
        timesteps = random_integers(0, self.config.timesteps, (slices.shape[0],), generator, slices.device)
        inputs = self.mask_for_training(slices, brain_mask, generator)
        predicted = self(inputs, timesteps, self.draw_noise(slices, generator))
        return torch.nn.functional.l1_loss(predicted, slices)

    @torch.no_grad()
    def reconstruct(
        self,
        slices: torch.Tensor,
        t: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One-step pseudo-healthy reconstruction at noise level ``t`` (default ``t_test``);
        for several levels, the mean of their reconstructions (fresh noise for each)."""
        levels = noise_levels(t, self.config)
        results = [self.reconstruct_at(slices, level, generator) for level in levels]
        return torch.stack(results).mean(dim=0) if len(results) > 1 else results[0]

    def reconstruct_at(self, slices: torch.Tensor, t: int, generator: torch.Generator | None) -> torch.Tensor:
        timesteps = torch.full((slices.shape[0],), t, dtype=torch.long, device=slices.device)
        return self(slices, timesteps, self.draw_noise(slices, generator)).clamp(0.0, 1.0)


def noise_levels(t: int | Sequence[int] | None, config: DDPMConfig) -> list[int]:
    """The noise level(s) asked for, checked against the schedule."""
    if t is None:
        levels = [config.t_test]
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        levels = [int(t)]
    else:
        levels = [int(level) for level in t]
    if not levels:
        raise ValueError("at least one noise level is needed")
    for level in levels:
        if not 0 < level < config.timesteps:
            raise ValueError(f"noise level must be between 1 and {config.timesteps - 1}, not {level}")
    return levels
