"""Diffusion models on MONAI, and rebuilding them from a checkpoint's metadata.

The papers' reconstruction is one step: noise a healthy-looking slice to level ``t_test`` (500
of T = 1000), and let the network predict the clean slice x0 directly. The network is MONAI's
``DiffusionModelUNet``; the noise schedule is MONAI's ``DDPMScheduler`` (linear β from 1e-4 to
2e-2). Inputs are model-space slices in [0, 1]; the network works in [-1, 1] as in the papers.

This module holds the plain DDPM (AnoDDPM-style, Gaussian or simplex noise). pDDPM, cDDPM and
the baselines join it with the training module; each is rebuilt from its checkpoint's
``kind`` and ``hyperparameters`` alone, so loading a model never needs code from the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .preprocess import ModelSpaceSpec


@dataclass(frozen=True)
class DDPMConfig:
    """Hyper-parameters of a DDPM; stored in the checkpoint and enough to rebuild the network."""

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 16
    num_head_channels: int = 32
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    noise: str = "gaussian"  # or "simplex"
    t_test: int = 500

    def __post_init__(self):
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per U-Net level")
        if self.noise not in ("gaussian", "simplex"):
            raise ValueError(f"noise must be 'gaussian' or 'simplex', not {self.noise!r}")
        if not 0 < self.t_test < self.timesteps:
            raise ValueError(f"t_test must be between 1 and {self.timesteps - 1}, not {self.t_test}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DDPMConfig":
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown DDPM hyper-parameters: {', '.join(sorted(unknown))}")
        for name in ("channels", "attention_levels"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


class DDPM(torch.nn.Module):
    """A U-Net that predicts the clean slice x0 from a noised one, with its noise schedule."""

    kind = "ddpm"

    def __init__(self, config: DDPMConfig = DDPMConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__()
        self.config = config
        self.spec = spec
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.timesteps,
            schedule="linear_beta",
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            prediction_type="sample",
        )

    def draw_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.noise == "simplex":
            from .noise import simplex_noise_2d

            return simplex_noise_2d(tuple(like.shape), generator=generator, device=like.device, dtype=like.dtype)
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def forward(self, slices: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 predicted from ``slices`` (B, 1, H, W) in [0, 1] noised to ``timesteps``; in [0, 1]."""
        clean = slices * 2.0 - 1.0
        noised = self.scheduler.add_noise(clean, noise, timesteps)
        predicted = self.unet(noised, timesteps)
        return (predicted + 1.0) / 2.0

    @torch.no_grad()
    def reconstruct(
        self, slices: torch.Tensor, t: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One-step pseudo-healthy reconstruction of a batch of slices at noise level ``t``."""
        t = self.config.t_test if t is None else int(t)
        timesteps = torch.full((slices.shape[0],), t, dtype=torch.long, device=slices.device)
        return self(slices, timesteps, self.draw_noise(slices, generator)).clamp(0.0, 1.0)

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hyperparameters": self.config.to_dict(),
            "model_space": self.spec.to_dict(),
        }


MODEL_KINDS: dict[str, type[DDPM]] = {"ddpm": DDPM}


def save_model(path: str | Path, model: DDPM, extra: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a model with its metadata (plus training details in ``extra``) as a checkpoint."""
    return save_checkpoint(path, model.state_dict(), {**(extra or {}), **model.metadata()}, overwrite=overwrite)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[DDPM, dict[str, Any]]:
    """Rebuild a model from a checkpoint's metadata and load its weights (no code from the file)."""
    state, metadata = load_checkpoint(path, device=device)
    kind = metadata["kind"]
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; this version knows {', '.join(MODEL_KINDS)}")
    try:
        config = DDPMConfig.from_dict(metadata.get("hyperparameters", {}))
        spec = ModelSpaceSpec.from_dict(metadata["model_space"]) if "model_space" in metadata else ModelSpaceSpec()
        model = MODEL_KINDS[kind](config, spec)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: its hyper-parameters do not describe a valid {kind} ({error})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: the weights do not fit the {kind} its metadata describes ({first_line})") from None
    return model.to(device).eval(), metadata
