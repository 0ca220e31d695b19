"""MAEDiff: a patched DDPM whose U-Net gets a masked-autoencoder branch on its H/4 feature map.

Xu, Wang and Du, "MAEDiff: Masked Autoencoder-enhanced Diffusion Models for Unsupervised
Anomaly Detection in Brain Images" (no public code). The paper's facts this module follows:

- A hierarchical partition: "we divide an image x0 into non-overlapping r × r sub-level grids
  (r < p), from which potentially overlapping p × p upper-level patches can be sampled with
  uniform spacing ... s units (s is divisible by r)", giving N = HW / r² grids and
  K = (H − p + s)(W − p + s) / s² patches; "we set the patch size to p = 48, patch stride to
  s = 16, and grid size to r = 16": K = 16 overlapping patches and N = 36 grids on 96².
- Training (Algorithm 1) is pDDPM's: t ~ Uniform({1, ..., T}), simplex noise (N = 6 octaves,
  γ = 0.8), one randomly chosen patch noised, x̃_t = x_t ⊙ M_p + x0 ⊙ ¬M_p (eq. 8), the
  network predicts x0 and the loss is L_p = |x0 − x0_rec| ⊙ M_p (eq. 9); linear β 1e-4 → 2e-2,
  t_test = 500. Inference (Algorithm 2) noises and denoises the K patches in turn with one
  simplex field and averages "the overlapping regions" - all of it :class:`PDDPM`'s.
- The MAE works "on the feature map f ∈ R^{C × H/4 × W/4}, which is extracted by the U-Net
  encoder", divided into non-overlapping r/4 × r/4 cells (one token per cell, N tokens).
  "Grid cells that correspond to the noised patch are treated as masked, while the others are
  considered visible": the masking is not a random ratio but the noised patch itself, so
  (p/r)² = 9 of the 36 tokens (a ratio of 0.25) are masked, and which ones follows from the
  drawn patch.
- MAE encoder: "a trainable linear projection to patchify the input feature map", position
  embeddings added, and ViT blocks that operate "exclusively on the visible grids" ("the small
  ViT ... 12 ViT blocks with hidden size d1 of 384 and 6 attention heads").
- MAE decoder: it "processes the entire feature map f (or both the masked and visible grids)"
  through its own linear projection ("two distinct linear projections for the encoder and
  decoder"); "We insert cross-attention layers before the self-attention layers in the ViT
  blocks ... to attend to the visible latents", the decoder blocks "uniformly attend to the
  outputs of the MAE encoder blocks" in "a U-shaped structure" (8 blocks, width d2 = 512,
  16 heads). Here decoder block j attends to encoder block E − 1 − ⌊j·E/D⌋: the first decoder
  block to the deepest encoder output, then uniformly shallower.
- "The fixed sinusoidal position embeddings are added to the tokens. We do not integrate the
  timestep embeddings in our MAE mechanism."
- "we first reshape the grid feature z ∈ R^{N × d2} into ... d2 × H/r × W/r, and then upsample
  it to C × H/4 × W/4 using deconvolution layers ... added to the U-Net encoder output feature f
  ..., serving as input to the following bottleneck blocks and the U-Net decoder."

Choices the paper leaves open, made here:

- The feature map is the output of the last down block of a three-level U-Net (two
  downsamplings: H/4), so the configuration insists on three levels; the MAE output is added
  there, right before MONAI's middle block. The U-Net's forward is re-run block by block
  (:meth:`MAEDiff.unet_with_mae`); with a zero MAE output it equals MONAI's own forward.
- The deconvolution is log2(r/4) stride-2 transposed convolutions (GELU between them), the last
  one zero-initialised: an untrained MAEDiff starts as the plain patched U-Net.
- Test time: Algorithm 2 calls the same p_θ(x̃_t, x̂_0, t) for each patch, so the MAE does not
  see all tokens at test time either - each of the K patched inputs masks the cells of its own
  noised patch, exactly as in training.
- The visible region x̂_0 "serves as a conditioning input" only through the MAE (its encoder
  sees the visible cells only); the network's image input stays pDDPM's one channel x̃_t.
- The paper's best U-Net also has global attention at 48² and 24² ("U-Net + Att. + MAE",
  Table 2); that is ``attention_levels``, off by default as for every DDPM here (CPU cost).
- Sizes: the defaults are scaled down for a CPU (see :class:`MAEDiffConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from ..preprocess import ModelSpaceSpec
from .pddpm import PDDPM, PDDPMConfig

__all__ = ["MAEDiff", "MAEDiffConfig", "GridMAE", "decoder_memories", "sincos_positions_2d"]


@dataclass(frozen=True)
class MAEDiffConfig(PDDPMConfig):
    """pDDPM hyper-parameters (patch 48, stride 16 as in the paper) plus the grid and the MAE.

    The paper's MAE is a ViT-S encoder (12 blocks, width 384, 6 heads) and a decoder of 8
    blocks, width 512, 16 heads, on a GPU. The defaults here keep that structure (an encoder
    on the visible tokens, a deeper-to-shallower cross-attending decoder, heads of 32 channels)
    but scaled down for a 2-core CPU: 2 encoder blocks of width 96 with 3 heads, 2 decoder
    blocks of width 128 with 4 heads. On 36 tokens the MAE then costs little next to the
    U-Net's convolutions at 96². The paper's sizes are one config away:
    ``mae_encoder_depth=12, mae_encoder_width=384, mae_encoder_heads=6, mae_decoder_depth=8,
    mae_decoder_width=512, mae_decoder_heads=16``.
    """

    patch_stride: int | None = 16
    grid_size: int = 16  # r, in image pixels; a token covers r/4 × r/4 cells of the H/4 feature map
    mae_encoder_depth: int = 2
    mae_encoder_width: int = 96
    mae_encoder_heads: int = 3
    mae_decoder_depth: int = 2
    mae_decoder_width: int = 128
    mae_decoder_heads: int = 4
    mae_mlp_ratio: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if len(self.channels) != 3:
            raise ValueError(
                f"MAEDiff needs a three-level U-Net (its encoder output at H/4), not {len(self.channels)} levels"
            )
        cell = self.grid_size // 4
        if self.grid_size % 4 or cell & (cell - 1):
            raise ValueError(f"grid_size must be 4 times a power of two (4, 8, 16, 32, ...), not {self.grid_size}")
        if self.patch_size % self.grid_size or self.stride % self.grid_size:
            raise ValueError(
                f"patch_size ({self.patch_size}) and the patch stride ({self.stride}) must be multiples of "
                f"grid_size ({self.grid_size}), so that every patch covers whole grid cells"
            )
        for part in ("encoder", "decoder"):
            depth, width, heads = (getattr(self, f"mae_{part}_{name}") for name in ("depth", "width", "heads"))
            if depth < 1:
                raise ValueError(f"mae_{part}_depth must be at least 1, not {depth}")
            if heads < 1 or width % heads or width % 4:
                raise ValueError(
                    f"mae_{part}_width ({width}) must be a multiple of 4 and of mae_{part}_heads ({heads})"
                )
        if self.mae_mlp_ratio <= 0:
            raise ValueError(f"mae_mlp_ratio must be positive, not {self.mae_mlp_ratio}")

    @property
    def cell(self) -> int:
        """Side of one token's cell on the H/4 feature map (r/4)."""
        return self.grid_size // 4


def sincos_positions_2d(rows: int, cols: int, width: int) -> torch.Tensor:
    """(rows·cols, width) fixed 2D sine-cosine position embeddings, row-major: the first half of
    the channels encodes the row, the second half the column, each as [sin, cos] of
    position · 10000^(−k / (width/4)) for k = 0 .. width/4 − 1 (as in MAE)."""
    if width % 4:
        raise ValueError(f"the width of sine-cosine positions must be a multiple of 4, not {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].to(torch.float64) * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([encode(row.reshape(-1)), encode(col.reshape(-1))], dim=1).float()


def decoder_memories(encoders: int, decoders: int) -> list[int]:
    """Which encoder block's output each decoder block cross-attends to, U-shaped and uniform:
    decoder block j to encoder block E − 1 − ⌊j·E/D⌋ (the paper's 12 and 8 blocks: 11, 10, 8,
    7, 5, 4, 2, 1)."""
    return [encoders - 1 - (j * encoders) // decoders for j in range(decoders)]


class _ViTBlock(nn.Module):
    """A pre-norm ViT block; with ``memory_width`` a cross-attention to a memory comes first."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, memory_width: int | None = None):
        super().__init__()
        self.cross_attends = memory_width is not None
        if self.cross_attends:
            self.norm_cross = nn.LayerNorm(width)
            self.norm_memory = nn.LayerNorm(memory_width)
            self.cross_attention = nn.MultiheadAttention(
                width, heads, kdim=memory_width, vdim=memory_width, batch_first=True
            )
        self.norm_attention = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross_attends:
            memory = self.norm_memory(memory)
            tokens = tokens + self.cross_attention(self.norm_cross(tokens), memory, memory, need_weights=False)[0]
        normed = self.norm_attention(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.mlp(self.norm_mlp(tokens))


class GridMAE(nn.Module):
    """The MAE branch on a (B, C, h, w) feature map cut into ``cell`` × ``cell`` cells, one token
    per cell (row-major): returns a (B, C, h, w) feature to add to the map."""

    def __init__(self, channels: int, cell: int, grid: tuple[int, int], config: MAEDiffConfig):
        super().__init__()
        self.cell, self.grid = cell, grid
        encoder_width, decoder_width = config.mae_encoder_width, config.mae_decoder_width
        # Linear projections of each cell's C·cell² values: a convolution with stride = kernel.
        self.encoder_embedding = nn.Conv2d(channels, encoder_width, cell, stride=cell)
        self.decoder_embedding = nn.Conv2d(channels, decoder_width, cell, stride=cell)
        # Fixed, so buffers, and rebuilt from the configuration rather than stored.
        self.register_buffer("encoder_positions", sincos_positions_2d(*grid, encoder_width), persistent=False)
        self.register_buffer("decoder_positions", sincos_positions_2d(*grid, decoder_width), persistent=False)
        self.encoder_blocks = nn.ModuleList(
            _ViTBlock(encoder_width, config.mae_encoder_heads, config.mae_mlp_ratio)
            for _ in range(config.mae_encoder_depth)
        )
        self.decoder_blocks = nn.ModuleList(
            _ViTBlock(decoder_width, config.mae_decoder_heads, config.mae_mlp_ratio, memory_width=encoder_width)
            for _ in range(config.mae_decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.memory_of_block = decoder_memories(config.mae_encoder_depth, config.mae_decoder_depth)
        layers: list[nn.Module] = []
        if cell == 1:
            layers.append(nn.Conv2d(decoder_width, channels, 1))
        else:
            width = decoder_width
            for _ in range(int(math.log2(cell))):
                layers += [nn.ConvTranspose2d(width, channels, 2, stride=2), nn.GELU()]
                width = channels
            layers.pop()  # no activation after the last deconvolution
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.upsample = nn.Sequential(*layers)

    def tokens(self, feature: torch.Tensor, embedding: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """(B, N, width) grid tokens of ``feature`` with their positions added."""
        rows, cols = feature.shape[-2] // self.cell, feature.shape[-1] // self.cell
        if (rows, cols) != self.grid or feature.shape[-2] % self.cell or feature.shape[-1] % self.cell:
            raise ValueError(
                f"a feature map of {tuple(feature.shape[-2:])} is not the {self.grid} grid of {self.cell}-cells "
                "this MAE was built for"
            )
        return embedding(feature).flatten(2).transpose(1, 2) + positions

    def encode(self, feature: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's block outputs (each (B, V, encoder width)) on the visible tokens only;
        ``visible`` (B, V) holds each slice's visible token indices."""
        tokens = self.tokens(feature, self.encoder_embedding, self.encoder_positions)
        latent = tokens.gather(1, visible[:, :, None].expand(-1, -1, tokens.shape[-1]))
        latents = []
        for block in self.encoder_blocks:
            latent = block(latent)
            latents.append(latent)
        return latents

    def forward(self, feature: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        latents = self.encode(feature, visible)
        tokens = self.tokens(feature, self.decoder_embedding, self.decoder_positions)
        for block, memory in zip(self.decoder_blocks, self.memory_of_block):
            tokens = block(tokens, latents[memory])
        tokens = self.decoder_norm(tokens)
        grid = tokens.transpose(1, 2).reshape(feature.shape[0], -1, *self.grid)
        return self.upsample(grid)


class MAEDiff(PDDPM):
    """A patched DDPM (pDDPM's training and sliding-window test) with an MAE in its U-Net."""

    kind = "maediff"
    config_class = MAEDiffConfig
    # The paper scores with the l1 residual |x − x̂|.
    default_scorer = "residual"

    def __init__(self, config: MAEDiffConfig = MAEDiffConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        height, width = spec.in_plane
        if height % config.grid_size or width % config.grid_size:
            raise ValueError(
                f"the model's in-plane size {spec.in_plane} is not a multiple of grid_size {config.grid_size}"
            )
        grid = (height // config.grid_size, width // config.grid_size)
        self.mae = GridMAE(config.channels[-1], config.cell, grid, config)

    @property
    def token_count(self) -> int:
        return self.mae.grid[0] * self.mae.grid[1]

    def masked_tokens(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool, row-major over the r × r grid: a token is masked when its grid cell
        meets the noised patch of (B, 1, H, W) bool ``patch_mask``."""
        size = self.config.grid_size
        batch, _, height, width = patch_mask.shape
        cells = patch_mask.reshape(batch, height // size, size, width // size, size)
        return cells.any(dim=4).any(dim=2).reshape(batch, -1)

    def visible_tokens(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(B, V) long: each slice's visible token indices in increasing order. Every patch covers
        the same number of whole grid cells, so V is the same for every slice."""
        visible = ~self.masked_tokens(patch_mask)
        counts = visible.sum(dim=1)
        if (counts != counts[0]).any() or counts[0] == 0:
            raise ValueError(f"every slice needs the same, non-zero number of visible tokens, not {counts.tolist()}")
        order = torch.argsort((~visible).to(torch.uint8), dim=1, stable=True)
        return order[:, : int(counts[0])]

    def unet_with_mae(self, noised: torch.Tensor, timesteps: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MONAI's DiffusionModelUNet forward, block by block, with the MAE's output added to the
        encoder's H/4 feature map before the middle (bottleneck) block. x0 in [-1, 1]."""
        unet = self.unet
        embedding = get_timestep_embedding(timesteps, unet.block_out_channels[0]).to(dtype=noised.dtype)
        embedding = unet.time_embed(embedding)
        hidden = unet.conv_in(noised)
        skips = [hidden]
        for block in unet.down_blocks:
            hidden, residuals = block(hidden_states=hidden, temb=embedding, context=None)
            skips.extend(residuals)
        hidden = hidden + self.mae(hidden, visible)
        hidden = unet.middle_block(hidden_states=hidden, temb=embedding, context=None)
        for block in unet.up_blocks:
            count = len(block.resnets)
            skips, residuals = skips[:-count], skips[-count:]
            hidden = block(hidden_states=hidden, res_hidden_states_list=residuals, temb=embedding, context=None)
        return unet.out(hidden)

    def denoise(self, noised: torch.Tensor, timesteps: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """Without a patch (DDPM's whole-slice forward) no grid cell is masked."""
        visible = torch.arange(self.token_count, device=noised.device).expand(noised.shape[0], -1)
        return self.unet_with_mae(noised, timesteps, visible)

    def predict_patched(self, slices, patch_mask, timesteps, noise, clean=None):
        """x0 in [0, 1] from ``slices`` noised inside ``patch_mask``; the MAE masks the grid
        cells of that patch (in training and at test time alike)."""
        inputs = self.patched_input(slices, patch_mask, timesteps, noise)
        visible = self.visible_tokens(patch_mask.expand(slices.shape[0], *patch_mask.shape[1:]))
        return (self.unet_with_mae(inputs, timesteps, visible) + 1.0) / 2.0
