"""cDDPM: a DDPM whose U-Net is conditioned on a context vector encoded from its own input.

Behrendt et al., "Guided Reconstruction with Conditioned Diffusion Models for Unsupervised
Anomaly Detection in Brain MRIs" (thesis ch. 3.4.3 / 8.3). A ResNet encoder turns the un-noised
input slice x into a context vector c = F_enc(x) in R^d (d = 128). The sinusoidal timestep
embedding is projected to c_t in R^d (MLP I); c' = [c_t, c] in R^2d is projected in every
residual block to (γ, β) in R^2C (MLP II), and the block's normalised features become
f' = f·(γ + 1) + β (FiLM). At test time c comes from the (possibly anomalous) input itself: it
carries coarse intensity information that noising destroys, not pixel detail to copy.

MONAI's ``DiffusionModelUNet`` adds the projected time embedding to the features and accepts
only integer class labels, so this module keeps MONAI's U-Net (its down/mid/up blocks,
attention, time-embedding MLP, output layer) and swaps each of its residual blocks for a FiLM
residual block of ours. Everything else - noise schedule, one-step x0 reconstruction, noise
level ensembles, mDDPM masking - is inherited from :class:`DDPM`.

The optional masked pre-training of the encoder (the paper uses SparK, 65 % masked) is a
training step, so it lives in the training module (``brain_uad_training.pretrain_encoder``);
the model itself needs none of it to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import DiffusionModelUNet, ResNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn

from ..preprocess import ModelSpaceSpec
from .ddpm import DDPM, DDPMConfig


@dataclass(frozen=True)
class CDDPMConfig(DDPMConfig):
    """DDPM hyper-parameters plus the context encoder's.

    ``context_dim`` is the paper's d: "We evaluated several conditioning dimensions,
    d ∈ {32, 64, 128, 256, 512}, and observed that the model achieved optimal performance when
    d = 128." The encoder is MONAI's 2D ResNet with a fully connected head to d ("a
    ResNet-backbone with a fully connected layer to match the target dimension of c"). The paper
    gives no depth; the authors' code uses resnet50, which would be ~5x the size of this
    project's (already 4x narrower than the paper's) U-Net, so the default is the ResNet-18
    layout; ``encoder_block="bottleneck"``, ``encoder_layers=(3, 4, 6, 3)`` and
    ``encoder_channels=(64, 128, 256, 512)`` give resnet50.
    """

    context_dim: int = 128
    encoder_block: str = "basic"  # or "bottleneck"
    encoder_layers: tuple[int, ...] = (2, 2, 2, 2)
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512)

    def __post_init__(self):
        super().__post_init__()
        if self.context_dim < 1:
            raise ValueError(f"context_dim must be at least 1, not {self.context_dim}")
        if self.encoder_block not in ("basic", "bottleneck"):
            raise ValueError(f"encoder_block must be 'basic' or 'bottleneck', not {self.encoder_block!r}")
        # MONAI's ResNet always has four stages.
        if len(self.encoder_layers) != 4 or len(self.encoder_channels) != 4:
            raise ValueError("encoder_layers and encoder_channels need one entry per ResNet stage (four)")
        if min(self.encoder_layers) < 1 or min(self.encoder_channels) < 1:
            raise ValueError("every ResNet stage needs at least one block and one channel")


class FiLMResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's diffusion residual block with the time-embedding addition replaced by FiLM.

    ``emb`` is the conditioning vector c' = [c_t, c]; MLP II (SiLU, then a linear layer, one per
    block since every block at level i has C_i channels) maps it to (γ, β), and the output of
    the second normalisation becomes norm(f)·(γ + 1) + β, as in the paper's Fig. 1 and the
    scale-shift-norm residual blocks of the authors' U-Net.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        conditioning_dim: int,
        out_channels: int | None = None,
        up: bool = False,
        down: bool = False,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, conditioning_dim, out_channels, up, down, norm_num_groups, norm_eps
        )
        # MONAI's additive time projection has no role here: FiLM carries time and context.
        del self.time_emb_proj
        self.film_projection = nn.Linear(conditioning_dim, 2 * self.out_channels)
        # Zero so that γ = β = 0 and FiLM starts as the identity: an untrained block is a plain
        # residual block, and the conditioning grows from there instead of from random scales.
        nn.init.zeros_(self.film_projection.weight)
        nn.init.zeros_(self.film_projection.bias)

    @classmethod
    def replacing(cls, block: DiffusionUNetResnetBlock, conditioning_dim: int) -> "FiLMResnetBlock":
        """A FiLM block with the same shape as MONAI's ``block`` (whose weights are not kept)."""
        return cls(
            block.spatial_dims,
            block.channels,
            conditioning_dim,
            block.out_channels,
            up=block.up,
            down=block.down,
            norm_num_groups=block.norm1.num_groups,
            norm_eps=block.norm1.eps,
        )

    def film_parameters(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), each (B, C_out), from the conditioning vector (B, conditioning_dim)."""
        scale, shift = self.film_projection(self.nonlinearity(emb)).chunk(2, dim=1)
        return scale, shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        scale, shift = self.film_parameters(emb)
        spatial = (None,) * self.spatial_dims
        h = self.norm2(h) * (scale[(..., *spatial)] + 1.0) + shift[(..., *spatial)]
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


class FiLMDiffusionUNet(DiffusionModelUNet):
    """MONAI's 2D diffusion U-Net, conditioned by FiLM on [time embedding, context vector].

    Built as MONAI builds it, then: the time-embedding MLP (MLP I) projects to ``context_dim``
    (the paper's c_t in R^d), and every residual block is swapped for a :class:`FiLMResnetBlock`
    reading the 2d-wide c'. Module names stay MONAI's, so state-dict keys are stable.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        attention_levels: tuple[bool, ...],
        num_res_blocks: int,
        norm_num_groups: int,
        num_head_channels: int,
        context_dim: int,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )
        self.context_dim = context_dim
        # MLP I with MONAI's layout (linear, SiLU, linear) but ending in d, as the paper has it.
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], context_dim), nn.SiLU(), nn.Linear(context_dim, context_dim)
        )
        _swap_resnet_blocks(self, conditioning_dim=2 * context_dim)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """x0 from ``x`` (B, 1, H, W) at ``timesteps`` (B,), conditioned on ``context`` (B, d)."""
        if context.shape != (x.shape[0], self.context_dim):
            raise ValueError(f"context must be (batch, {self.context_dim}), not {tuple(context.shape)}")
        time_features = get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype)
        conditioning = torch.cat([self.time_embed(time_features), context.to(dtype=x.dtype)], dim=1)

        # MONAI's own down / mid / up pass, with c' where it passes its time embedding.
        h = self.conv_in(x)
        skips = [h]
        for down_block in self.down_blocks:
            h, outputs = down_block(hidden_states=h, temb=conditioning, context=None)
            skips.extend(outputs)
        h = self.middle_block(hidden_states=h, temb=conditioning, context=None)
        for up_block in self.up_blocks:
            taken = len(up_block.resnets)
            h = up_block(hidden_states=h, res_hidden_states_list=skips[-taken:], temb=conditioning, context=None)
            skips = skips[:-taken]
        return self.out(h)


def _swap_resnet_blocks(module: nn.Module, conditioning_dim: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, FiLMResnetBlock):
            continue
        if isinstance(child, DiffusionUNetResnetBlock):
            setattr(module, name, FiLMResnetBlock.replacing(child, conditioning_dim))
        else:
            _swap_resnet_blocks(child, conditioning_dim)


def build_encoder(config: CDDPMConfig) -> ResNet:
    """F_enc: MONAI's 2D ResNet (stem stride 2 and max-pool, as the standard ResNets) with a
    fully connected head to ``context_dim``. Batch norm, as in the authors' timm ResNets."""
    return ResNet(
        block=config.encoder_block,
        layers=list(config.encoder_layers),
        block_inplanes=list(config.encoder_channels),
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        num_classes=config.context_dim,
    )


class CDDPM(DDPM):
    """A DDPM whose U-Net is conditioned (FiLM) on a ResNet encoding of its un-noised input."""

    kind = "cddpm"
    config_class = CDDPMConfig

    def __init__(self, config: CDDPMConfig = CDDPMConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        self.encoder = build_encoder(config)

    @staticmethod
    def build_unet(config: CDDPMConfig) -> nn.Module:
        return FiLMDiffusionUNet(
            channels=config.channels,
            attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
            context_dim=config.context_dim,
        )

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """The context vector c (B, d) of slices (B, 1, H, W) in [0, 1]; the encoder sees them in
        [-1, 1], the range the U-Net works in."""
        return self.encoder(slices * 2.0 - 1.0)

    def denoise(self, noised: torch.Tensor, timesteps: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        # ``slices`` is what the network is given: the clean slice (masked by mDDPM if that is
        # on) in training, the possibly anomalous slice at test time - the method's context.
        return self.unet(noised, timesteps, self.encode(slices))
