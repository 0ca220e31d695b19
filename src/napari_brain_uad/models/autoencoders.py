"""The autoencoder baselines users compare the diffusion models against: AE, VAE and DAE.

The thesis (sec. 3.3, "Baselines") scores all three by the pixel-wise l1 error between input and
reconstruction:

- **AE** [Baur et al.]: "a convolutional AE to reconstruct the input image". Dense latent of 128
  ("For AEs and VAEs, we set the latent dimension to 128", thesis ch. 8.5 / 8.6).
- **VAE** [Baur et al.]: the AE with a Gaussian latent; "For VAEs, β_KLD = 0.001 is chosen"; the
  loss is "based on the l1-distance between our input and output combined with the
  distribution-matching Kullback-Leibler divergence" (thesis ch. 8.1).
- **DAE** [Kascenas et al., MIDL 2022]: "a Unet is used as the AE architecture and upscaled
  Gaussian noise is added to the input [...] during evaluation, no noise is applied to the
  input." The noise settings (16×16 coarse grid, std 0.2, bilinear upsampling, random
  translation, only where the input is non-zero, squared-error loss) are those of the authors'
  public code; the thesis gives none.

The networks are MONAI's (``AutoEncoder``, ``VarAutoEncoder``, ``UNet``); this module adds only
what MONAI lacks: a dense latent for the plain autoencoder, a reparameterisation that draws from a
given generator, and the coarse noise. None of the three uses noise levels: ``t`` is ignored and
reconstruction draws no random numbers, so a slice always gets the same reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder, UNet, VarAutoEncoder
from torch import nn

from ..noise import gaussian_noise
from ..preprocess import ModelSpaceSpec
from .base import DenoisingParts, ModelConfig, ReconstructionModel, random_integers

RECONSTRUCTION_LOSSES = ("l1", "l2")
LATENT_KINDS = ("dense", "spatial")
NOISE_REGIONS = ("foreground", "brain", "everywhere")


def reconstruction_error(predicted: torch.Tensor, target: torch.Tensor, loss: str,
                         excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-pixel l1 or squared error: per pixel, so that its scale does not depend on the
    slice size. Pixels marked in ``excluded`` (bool, the target's shape) count for nothing: the
    mean is over the others."""
    if excluded is None:
        return F.l1_loss(predicted, target) if loss == "l1" else F.mse_loss(predicted, target)
    error = (predicted - target).abs() if loss == "l1" else (predicted - target).square()
    kept = (~excluded.to(device=error.device, dtype=torch.bool)).to(error.dtype)
    return (error * kept).sum() / kept.sum().clamp_min(1.0)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over latent dimensions, mean over the batch."""
    per_dimension = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_dimension.flatten(1).sum(dim=1).mean()


def _check_encoder_layout(channels: Sequence[int], strides: Sequence[int]) -> None:
    if not channels:
        raise ValueError("channels needs at least one entry")
    if len(channels) != len(strides):
        raise ValueError(f"channels and strides need one entry per level, got {len(channels)} and {len(strides)}")
    if any(int(c) != c or c < 1 for c in channels):
        raise ValueError(f"every entry of channels must be a positive int, not {channels}")
    if any(int(s) != s or s < 1 for s in strides):
        raise ValueError(f"every entry of strides must be a positive int, not {strides}")


def _check_loss(loss: str) -> None:
    if loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(RECONSTRUCTION_LOSSES)}, not {loss!r}")


def _check_slice_size(spec: ModelSpaceSpec, strides: Sequence[int], kind: str) -> tuple[int, int]:
    """Encoded size of a slice; refuses sizes that the strides do not divide, since the decoder
    would then return a slice of another size than the input."""
    downsampling = math.prod(strides)
    height, width = spec.in_plane
    if height % downsampling or width % downsampling:
        raise ValueError(
            f"the {kind}'s strides downsample by {downsampling}, which must divide the slice size "
            f"{height}×{width}; change strides or the model space's in_plane"
        )
    return height // downsampling, width // downsampling


@dataclass(frozen=True)
class AEConfig(ModelConfig):
    """A convolutional autoencoder's hyper-parameters.

    ``latent="dense"`` (the thesis's AE, latent dimension 128) flattens the last feature map
    into a vector of ``latent_size``; ``"spatial"`` keeps the last feature map as the bottleneck
    (``latent_size`` is then unused). The layout of the convolutions is not given in the thesis:
    four stride-2 levels take 96×96 to 6×6, as in the VAE figure of thesis ch. 8.1 (convolutions
    down, transposed convolutions up).
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    latent: str = "dense"
    latent_size: int = 128
    num_res_units: int = 0
    loss: str = "l1"

    def __post_init__(self):
        _check_encoder_layout(self.channels, self.strides)
        if self.latent not in LATENT_KINDS:
            raise ValueError(f"latent must be one of {', '.join(LATENT_KINDS)}, not {self.latent!r}")
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be at least 1, not {self.latent_size}")
        if self.num_res_units < 0:
            raise ValueError(f"num_res_units must be 0 or more, not {self.num_res_units}")
        _check_loss(self.loss)


class DenseLatentAutoEncoder(AutoEncoder):
    """MONAI's AutoEncoder with a fully connected bottleneck (MONAI has one only in its VAE).

    The encoder's last feature map (C, h, w) is flattened and mapped to ``latent_size`` numbers,
    and back; the rest (convolutions down, transposed convolutions up) is MONAI's.
    """

    def __init__(self, encoded_size: tuple[int, int], latent_size: int, **autoencoder_arguments):
        super().__init__(**autoencoder_arguments)
        self.encoded_shape = (self.encoded_channels, *encoded_size)
        flat_size = math.prod(self.encoded_shape)
        self.to_latent = nn.Linear(flat_size, latent_size)
        self.from_latent = nn.Linear(latent_size, flat_size)

    def encode_to_latent(self, x: torch.Tensor) -> torch.Tensor:
        features = self.intermediate(self.encode(x))
        return self.to_latent(features.flatten(1))

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        # ReLU after the linear layer, as MONAI's VarAutoEncoder does before its decoder.
        features = F.relu(self.from_latent(z)).view(z.shape[0], *self.encoded_shape)
        return self.decode(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_from_latent(self.encode_to_latent(x))


# The submodules of MONAI's AutoEncoder (and our dense-latent one) on the encoding side.
_AE_ENCODER_PARTS = ("encode", "intermediate", "to_latent")


def monai_unet_part(parameter_name: str) -> str:
    """"encoder" or "decoder": which side of MONAI's UNet a parameter of it sits on.

    MONAI nests each level as Sequential(down, SkipConnection(the levels below), up), so a
    name reads model.<0|1|2>[.submodule.<0|1|2>...]: 0 is a level's down path, 2 its up path,
    1.submodule the levels below; the innermost submodule (no index) is the bottom block, which
    counts as encoder."""
    tokens = parameter_name.split(".")
    index = 1 if tokens[0] == "model" else 0
    while index < len(tokens):
        token = tokens[index]
        if token == "0":
            return "encoder"
        if token == "2":
            return "decoder"
        if token == "1" and index + 1 < len(tokens) and tokens[index + 1] == "submodule":
            index += 2
            continue
        return "encoder"  # the bottom block
    return "encoder"


class AE(ReconstructionModel):
    """Convolutional autoencoder: the bottleneck alone keeps it from copying anomalies."""

    kind = "ae"
    config_class = AEConfig
    excludes_voxels = True
    uses_noise_level = False

    def __init__(self, config: AEConfig = AEConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        encoded_size = _check_slice_size(spec, config.strides, "AE")
        arguments = dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
        )
        if config.latent == "dense":
            self.network = DenseLatentAutoEncoder(encoded_size, config.latent_size, **arguments)
        else:
            self.network = AutoEncoder(**arguments)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """The decoder's unbounded output; :meth:`reconstruct` clamps it to [0, 1].

        No sigmoid: it starts every pixel at 0.5 and its flat tails slow down learning the
        background (half of a slice is 0). On the IXI test slices, 20 Adam steps lowered the l1
        loss of a small dense AE by 20 % with a sigmoid and by 59 % without.
        """
        return self.network(slices)

    def denoising_parts(self) -> DenoisingParts:
        encoder = [p for name, p in self.network.named_parameters() if name.split(".")[0] in _AE_ENCODER_PARTS]
        decoder = [p for name, p in self.network.named_parameters() if name.split(".")[0] not in _AE_ENCODER_PARTS]
        return DenoisingParts(self.network, encoder, decoder)

    def training_loss(self, slices, brain_mask=None, generator=None, excluded=None):
        """Reconstruction error of the clean slices outside ``excluded`` (no randomness;
        ``brain_mask`` and ``generator`` unused)."""
        return reconstruction_error(self(slices), slices, self.config.loss, excluded)

    @torch.no_grad()
    def reconstruct(self, slices, t=None, generator=None):
        """Deterministic reconstruction; ``t`` and ``generator`` are ignored."""
        return self(slices).clamp(0.0, 1.0)


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """A VAE's hyper-parameters: the AE's encoder/decoder with a Gaussian dense latent.

    ``beta`` weighs the KL term: thesis ch. 8.2, "For VAE and SVAE, we set the value of β_VAE to
    0.001" (also ch. 8.5/8.6, "β_KLD = 0.001"). Latent dimension 128 (ch. 8.1, "a latent space
    size of z ∈ R^128 [...] for our 2D [...] VAE"). The loss is the mean per-pixel l1 error plus
    beta times the KL divergence summed over latent dimensions (mean over the batch); the thesis
    does not say how either term is reduced, so this reduction is our choice.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    latent_size: int = 128
    num_res_units: int = 0
    beta: float = 0.001
    loss: str = "l1"

    def __post_init__(self):
        check_vae_settings(self)


def check_vae_settings(config) -> None:
    """What every VAE's settings must satisfy, 2D or 3D (``models.vae3d`` adds its grid's)."""
    _check_encoder_layout(config.channels, config.strides)
    if config.latent_size < 1:
        raise ValueError(f"latent_size must be at least 1, not {config.latent_size}")
    if config.num_res_units < 0:
        raise ValueError(f"num_res_units must be 0 or more, not {config.num_res_units}")
    if not (isinstance(config.beta, (int, float)) and math.isfinite(config.beta) and config.beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, not {config.beta!r}")
    _check_loss(config.loss)


def variational_network(spatial_dims: int, in_shape: Sequence[int], config) -> VarAutoEncoder:
    """Every VAE's network, 2D or 3D (MONAI's VarAutoEncoder: strided convolutions down, transposed
    convolutions up). Its output is unbounded: reconstructions are clamped instead (see AE.forward)."""
    return VarAutoEncoder(
        spatial_dims=spatial_dims,
        in_shape=(1, *in_shape),
        out_channels=1,
        latent_size=config.latent_size,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        use_sigmoid=False,
    )


class VariationalCoding:
    """What every VAE (2D slices, 3D volumes) does with its latent code; ``self.network`` is a
    :func:`variational_network`."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (B, latent_size)."""
        return self.network.encode_forward(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, ...) from latent codes: the decoder's unbounded output."""
        return self.network.decode_forward(z, use_sigmoid=False)

    def sample_latent(
        self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reparameterisation z = mu + sigma * eps, eps ~ N(0, I) from ``generator``."""
        eps = gaussian_noise(tuple(mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps


class VAE(VariationalCoding, ReconstructionModel):
    """Variational autoencoder on MONAI's ``VarAutoEncoder``.

    MONAI's own ``forward`` samples with torch's global random generator (and, in eval mode
    without ``use_mean_at_inference``, returns mu + sigma), so this class calls its encoder and
    decoder directly and draws the reparameterisation noise from the caller's generator.
    """

    kind = "vae"
    config_class = VAEConfig
    excludes_voxels = True
    uses_noise_level = False

    def __init__(self, config: VAEConfig = VAEConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        _check_slice_size(spec, config.strides, "VAE")
        self.network = variational_network(2, spec.in_plane, config)

    def loss_terms(
        self, slices: torch.Tensor, generator: torch.Generator | None = None, excluded: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The pieces of the training objective: reconstruction error (outside ``excluded``),
        KL, and mu/logvar."""
        mu, logvar = self.encode(slices)
        reconstruction = self.decode(self.sample_latent(mu, logvar, generator))
        return {
            "reconstruction": reconstruction_error(reconstruction, slices, self.config.loss, excluded),
            "kl": kl_divergence(mu, logvar),
            "mu": mu,
            "logvar": logvar,
        }

    def training_loss(self, slices, brain_mask=None, generator=None, excluded=None):
        """Reconstruction error outside ``excluded`` + beta * KL (``brain_mask`` unused)."""
        terms = self.loss_terms(slices, generator, excluded)
        return terms["reconstruction"] + self.config.beta * terms["kl"]

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        # Deterministic: decode the posterior mean, not a sample, so that a slice always gets the
        # same reconstruction and the residual is not blurred by sampling noise.
        mu, _ = self.encode(slices)
        return self.decode(mu)

    @torch.no_grad()
    def reconstruct(self, slices, t=None, generator=None):
        """Reconstruction from the latent mean (deterministic); ``t`` and ``generator`` are ignored."""
        return self(slices).clamp(0.0, 1.0)


def coarse_gaussian_noise(
    shape: Sequence[int],
    resolution: int = 16,
    std: float = 0.2,
    random_shift: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Kascenas et al.'s coarse noise: Gaussian values (std ``std``) on a ``resolution`` ×
    ``resolution`` grid, bilinearly upsampled to the slice size (B, C, H, W).

    The grid is treated as periodic (the last interpolation cell runs from the last node back to
    the first), so that the random translation, a circular shift of each slice's field by a
    random number of pixels, leaves no seam; the authors' code shifts a non-periodic field and
    gets a discontinuity where it wraps. Without the shift, pixel (i, j) with i·resolution/H and
    j·resolution/W whole numbers holds exactly that grid node's value; between nodes values are
    interpolated, so the per-pixel standard deviation is ``std`` at nodes and less in between.
    """
    batch, channels, height, width = (int(size) for size in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    grid = gaussian_noise((batch, channels, resolution, resolution), generator=generator, device=device, dtype=dtype)
    grid = grid * std
    periodic = torch.cat([grid, grid[:, :, :1, :]], dim=2)
    periodic = torch.cat([periodic, periodic[:, :, :, :1]], dim=3)
    # With align_corners, resolution + 1 nodes over height + 1 pixels puts node k at pixel
    # k·height/resolution; the extra last row/column (the wrapped first node) is then dropped.
    field = F.interpolate(periodic, size=(height + 1, width + 1), mode="bilinear", align_corners=True)
    field = field[:, :, :height, :width]
    if random_shift:
        shift_rows = random_integers(0, height, (batch,), generator, device)
        shift_columns = random_integers(0, width, (batch,), generator, device)
        rows = (torch.arange(height, device=device).view(1, height) - shift_rows.view(batch, 1)) % height
        columns = (torch.arange(width, device=device).view(1, width) - shift_columns.view(batch, 1)) % width
        index_rows = rows.view(batch, 1, height, 1).expand(batch, channels, height, width)
        field = torch.gather(field, 2, index_rows)
        index_columns = columns.view(batch, 1, 1, width).expand(batch, channels, height, width)
        field = torch.gather(field, 3, index_columns)
    return field.contiguous()


@dataclass(frozen=True)
class DAEConfig(ModelConfig):
    """A denoising autoencoder's hyper-parameters: MONAI's 2D U-Net plus the coarse noise.

    Noise defaults from Kascenas et al.'s public code (``noise_res=16``, ``noise_std=0.2``,
    noise "only [applied] in the foreground", input > 0.01, and a squared-error loss); they work
    at 128×128, where a 16×16 grid has 8-pixel cells; at 96×96 the cells are 6 pixels. Their
    U-Net has 4 levels of 64-512 channels with group norm (``depth=4, wf=6``); the thesis's
    SADM reuses it with "three layers with channel dimensions of 64, 128, and 256 [...] group
    normalization and SiLU". The default here keeps 4 levels and group norm at half the width,
    to train on a CPU; ``channels=(64, 128, 256, 512)`` gives the authors' width.

    ``noise_region``: "foreground" (input > ``foreground_threshold``, the authors'),
    "brain" (the brain mask passed to ``training_loss``; required then) or "everywhere".
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm_num_groups: int = 8
    noise_resolution: int = 16
    noise_std: float = 0.2
    noise_region: str = "foreground"
    foreground_threshold: float = 0.01
    random_shift: bool = True
    loss: str = "l2"

    def __post_init__(self):
        if len(self.channels) < 2:
            raise ValueError("a U-Net needs at least two levels of channels")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"a U-Net needs one stride fewer than channels, got {len(self.strides)} strides "
                f"for {len(self.channels)} channels"
            )
        _check_encoder_layout(self.channels, (*self.strides, 1))
        if self.norm_num_groups < 1 or any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every entry of channels must be a multiple of norm_num_groups ({self.norm_num_groups})")
        if self.num_res_units < 0:
            raise ValueError(f"num_res_units must be 0 or more, not {self.num_res_units}")
        if self.noise_resolution < 1:
            raise ValueError(f"noise_resolution must be at least 1, not {self.noise_resolution}")
        if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, not {self.noise_std!r}")
        if self.noise_region not in NOISE_REGIONS:
            raise ValueError(f"noise_region must be one of {', '.join(NOISE_REGIONS)}, not {self.noise_region!r}")
        _check_loss(self.loss)


class DAE(ReconstructionModel):
    """U-Net trained to remove coarse noise from healthy slices; at test it sees the clean input.

    The skip connections could copy anything; the denoising task is the only regulariser: the
    network learns to pull intensities that look unlike healthy tissue back to healthy ones.
    """

    kind = "dae"
    config_class = DAEConfig
    excludes_voxels = True
    uses_noise_level = False

    def __init__(self, config: DAEConfig = DAEConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        _check_slice_size(spec, config.strides, "DAE")
        # The U-Net returns channels[0] features and a 1×1 convolution maps them to the slice, as
        # the authors' U-Net ends: with residual units MONAI group-normalises its top up-sampling
        # output, which a single output channel could not be split into groups for.
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=config.channels[0],
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            act="SWISH",
            norm=("group", {"num_groups": config.norm_num_groups}),
        )
        self.output = nn.Conv2d(config.channels[0], 1, kernel_size=1)

    def noise_region_mask(self, slices: torch.Tensor, brain_mask: torch.Tensor | None) -> torch.Tensor:
        """Where the training noise goes, as a float mask (B, 1, H, W)."""
        region = self.config.noise_region
        if region == "foreground":
            return (slices > self.config.foreground_threshold).to(slices.dtype)
        if region == "brain":
            if brain_mask is None:
                raise ValueError("noise_region='brain' needs the brain mask passed to training_loss")
            return brain_mask.to(device=slices.device, dtype=slices.dtype)
        return torch.ones_like(slices)

    def add_training_noise(
        self, slices: torch.Tensor, brain_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The noised input the network learns to clean (not clamped, as in the authors' code)."""
        noise = coarse_gaussian_noise(
            tuple(slices.shape),
            resolution=self.config.noise_resolution,
            std=self.config.noise_std,
            random_shift=self.config.random_shift,
            generator=generator,
            device=slices.device,
            dtype=slices.dtype,
        )
        return slices + noise * self.noise_region_mask(slices, brain_mask)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """The U-Net's unbounded output: trained without a squashing layer, as the authors' U-Net."""
        return self.output(self.unet(slices))

    def denoising_parts(self) -> DenoisingParts:
        encoder, decoder = [], []
        for name, parameter in self.unet.named_parameters():
            (encoder if monai_unet_part(name) == "encoder" else decoder).append(parameter)
        return DenoisingParts(self.forward, encoder, [*decoder, *self.output.parameters()])

    def training_loss(self, slices, brain_mask=None, generator=None, excluded=None):
        """Error between the U-Net's output on the noised slices and the clean slices (whole slice,
        so that the background is reconstructed as background too), outside ``excluded``."""
        noised = self.add_training_noise(slices, brain_mask, generator)
        return reconstruction_error(self(noised), slices, self.config.loss, excluded)

    @torch.no_grad()
    def reconstruct(self, slices, t=None, generator=None):
        """The U-Net on the un-noised input (no randomness), clamped to [0, 1]; ``t`` and
        ``generator`` are ignored."""
        return self(slices).clamp(0.0, 1.0)
