"""PHANES: a latent generative model proposes where anomalies are, an inpainting GAN fills them in.

Bercea et al., "Reversing the abnormal: pseudo-healthy generative networks for anomaly detection"
(MICCAI 2023; code ci-ber/PHANES). Three parts, trained by one command in two stages of one run:

(a) **Coarse pseudo-healthy image** x_cph from a latent generative model trained on healthy
    slices. The paper's is a soft-introspective VAE with a reversed embedding loss (128² input,
    latent 128, channels 64-128-256-512-512, residual blocks with BatchNorm and LeakyReLU 0.2;
    β_rec 0.5, β_kl 1, β_neg 128, embedding-loss weight 0.005). **Ours is a plain VAE** (a first
    step): the network of our ``vae`` kind (:func:`autoencoders.variational_network`, MONAI's
    VarAutoEncoder with residual units and instance norm) on 96² slices, with the paper's
    weights of its ELBO terms: β_rec·(per-pixel error) + β_kl·KL/(H·W) (the code scales both
    by 1/(H·W) and uses the squared error). No introspective (β_neg) or embedding loss.
(b) **Anomaly mask** m = norm95(|eq(x_cph) − eq(x)|) · S_perc, where eq is CLAHE
    (``skimage.exposure.equalize_adapthist``, its defaults: clip limit 0.01, tiles of 1/8 of the
    slice), norm95 divides by the residual's own 95th percentile and clips at 1, and S_perc is a
    perceptual difference map smoothed by a Gaussian of σ = 2. It is binarised at a threshold,
    blurred (σ = 1.2) and grown (> 0.1 → 1). The paper binarises at the 99th percentile of
    healthy scores: by default (``mask_threshold`` None) that percentile of the mask scores
    inside the brain of the first stage-(c) training batch, kept in the checkpoint
    (:func:`healthy_mask_threshold`). The code fixes 0.153 at inference and 0.1 in training, on
    LPIPS's scale, which our default perceptual network does not share: at 0.1 our mask covered
    about 87 % of healthy brain in training against about 3 % at the inference threshold, so the
    GAN learnt to fill whole slices and was tested on small holes. We keep the code's ratio
    instead: by default (``training_mask_threshold`` None) the training threshold is the
    inference threshold × 0.1/0.153 (:data:`TRAINING_THRESHOLD_RATIO`). The paper takes S_perc of the
    equalised images, the code of the plain ones (``mask_perceptual_on_equalised``, default
    False as in the code). The code keeps the sub-threshold scores instead of zeroing them and
    blurs across the batch axis too; we binarise and blur each slice, as the paper says.
(c) **Inpainting GAN** (AOT-GAN; networks and random ellipses in ``models.inpainting``): the
    input is the slice with its masked pixels set to 1 plus the mask; a 7×7 convolution and two
    stride-2 convolutions, AOT blocks (four dilated 3×3 branches, dilations 1/2/4/8, fused, and
    mixed with the input through a spatial gate), two up-sampling convolutions and tanh. x_ph =
    x⊙(1−m) + G(x⊙(1−m) + m, m)⊙m: unmasked pixels are the input's. The paper's widths are
    64-128-256 with 8 AOT blocks; the defaults here are a quarter of that, 16-32-64 with 4
    blocks, to train on a 2-core CPU (same structure). The discriminator is a spectral-norm
    PatchGAN (64-128-256-512 there, 16-32-64-128 here) that predicts the Gaussian-blurred
    inpainting mask on the composite and 0 on real slices (the "soft mask-guided" GAN, least
    squares). The generator's loss is 1·L1 + 250·style + 0.1·perceptual + 0.01·adversarial. The
    reference code computes the generator's adversarial term but never backpropagates it; **we
    do**. Its style and perceptual losses use ImageNet VGG19 features, which cannot be
    downloaded here: **ours use the stage-(a) encoder's features** (Gram matrices for style, L1
    for perceptual, every encoder level weighted 1). GAN training masks: the stage-(b) mask at
    the training threshold plus 10 random ellipses per slice (centres in the middle half of the
    slice, semi-axes |N(2, 4)| pixels at 128², at least 2, scaled to our slice size).

**The perceptual map S_perc.** The paper uses LPIPS, which needs ImageNet weights torchvision
downloads on first use. The default here ships with us: the stage-(a) encoder's features of the
two images, per level 1 − cosine similarity over channels (LPIPS's channel-normalised feature
difference, unweighted), upsampled to the slice, averaged over levels and Gaussian-smoothed
(σ = 2). ``perceptual_network="lpips"`` (SqueezeNet, spatial, as the code) works only where the
``lpips`` package and torchvision's ImageNet weights are already installed; otherwise building
the model fails and says so. The code's threshold 0.153 was set for LPIPS's scale: with our
encoder's distance it masked about 22 % of each healthy slice, hence the measured default.

**Maps.** :meth:`PHANES.reconstruct_with_maps` returns x_ph and the maps "mask" (m) and
"perceptual" (S_perc(x_ph, x)). The ``phanes`` scorer, the paper's anomaly map
|x_ph − x| · S_perc(x_ph, x) (:func:`phanes_score`), is defined at the end of this module and
registered with scoring's registry; it is the kind's default scorer.

**Training in one run.** ``fit`` calls :meth:`PHANES.training_loss` once per step with one Adam
over every trainable parameter. The model keeps its own step counter (a buffer, so it is saved in
checkpoints and a resumed run continues in the right stage; it advances only in training mode, so
validation does not move it): the first ``vae_steps`` steps train the VAE, the rest the GAN with
the VAE frozen (x_cph and the mask under ``no_grad``; the encoder's features for the style and
perceptual losses are computed with detached weights, so the VAE gets no gradient). The GAN's two
players share the one optimizer: the loss is the sum of the discriminator's loss on (real,
composite.detach()), which reaches only the discriminator, and the generator's losses, whose
adversarial term goes through the discriminator called with detached weights
(``torch.func.functional_call``), so it reaches only the generator. Summing them is then the same
as two optimizers stepping at once (Adam is per parameter). In evaluation mode (validation) the
loss is that of the current stage: the VAE's, or the generator's inpainting terms (L1, style and
perceptual; the adversarial terms score a game between two networks, not the inpainting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..preprocess import ModelSpaceSpec
from ..scoring import Scorer, register_scorer
from ..scoring import residual as absolute_residual  # `residual` names local maps below
from ..scoring.arrays import ArrayLike, as_mask, as_tensor, device_of, output_like, work_dtype
from ..scoring.filters import SMOOTH_TRUNCATE, gaussian_filter
from .autoencoders import VAEConfig, VariationalCoding, kl_divergence, reconstruction_error, variational_network
from .base import ModelConfig, ReconstructionModel
# Re-exported too: they were defined here, and tests and callers import them from this module.
from .inpainting import (
    AOTBlock,
    InpaintingGenerator,
    PatchDiscriminator,
    gate_normalise,
    random_ellipses,
    rasterise_ellipses,
)

__all__ = [
    "AOTBlock",
    "InpaintingGenerator",
    "PHANES",
    "PHANESConfig",
    "PatchDiscriminator",
    "anomaly_mask",
    "equalize_adaptive",
    "gate_normalise",
    "gaussian_blur",
    "healthy_mask_threshold",
    "normalise_95",
    "phanes_score",
    "random_ellipses",
    "rasterise_ellipses",
]

STAGES = ("vae", "inpainting")
# The authors' code binarises the mask at 0.1 in training and 0.153 at inference (LPIPS's
# scale): training masks are larger, so the GAN learns to fill more than it will be asked to.
# We keep that ratio on whatever scale the perceptual network gives.
CODE_INFERENCE_THRESHOLD = 0.153
TRAINING_THRESHOLD_RATIO = 0.1 / CODE_INFERENCE_THRESHOLD
PERCEPTUAL_NETWORKS = ("encoder", "lpips")


@dataclass(frozen=True)
class PHANESConfig(ModelConfig):
    """PHANES's hyper-parameters: the stage schedule, then stages (a), (b) and (c).

    Stage (a), the VAE: ``channels``, ``strides``, ``latent_size``, ``num_res_units`` and
    ``loss`` as our ``vae`` kind; ``beta_rec`` and ``beta_kl`` are the paper's weights (the loss
    is beta_rec·per-pixel error + beta_kl·KL/(H·W)). Stage (b), the mask: thresholds at
    inference and in training, blur σ and growth level, the perceptual network and its
    smoothing. Stage (c), the GAN: the generator's three widths and AOT blocks, the
    discriminator's widths, loss weights, the σ (pixels) of the blur that turns the mask into the
    discriminator's target (10 at 128² in AOT-GAN, 7.5 at our 96²), and the random ellipses
    (semi-axes in pixels: |N(mean, std)|, at least ``ellipse_axis_min``; 2, 4 and 2 at 128² in
    the code, scaled to 96²).
    """

    vae_steps: int = 2000
    # (a) the coarse pseudo-healthy image
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    latent_size: int = 128
    num_res_units: int = 1
    beta_rec: float = 0.5
    beta_kl: float = 1.0
    loss: str = "l2"
    # (b) the anomaly mask
    # None: the paper's rule, the 99th percentile of the mask scores of healthy slices, measured
    # on the first batch of stage (c) (inside the brain) and kept in the checkpoint. The authors'
    # code fixes 0.153, a number on LPIPS's scale: with our default perceptual network (this
    # VAE's encoder) it masked about 22 % of every healthy slice, so it is not the default here.
    mask_threshold: float | None = None
    mask_threshold_percentile: float = 99.0
    # None: the inference threshold × TRAINING_THRESHOLD_RATIO (the code's 0.1 against 0.153).
    training_mask_threshold: float | None = None
    mask_blur_sigma: float = 1.2
    mask_grow_level: float = 0.1
    perceptual_network: str = "encoder"
    perceptual_sigma: float = 2.0
    mask_perceptual_on_equalised: bool = False
    clahe_clip_limit: float = 0.01
    # (c) the inpainting GAN
    generator_channels: tuple[int, int, int] = (16, 32, 64)
    aot_blocks: int = 4
    aot_rates: tuple[int, ...] = (1, 2, 4, 8)
    discriminator_channels: tuple[int, ...] = (16, 32, 64, 128)
    l1_weight: float = 1.0
    style_weight: float = 250.0
    perceptual_weight: float = 0.1
    adversarial_weight: float = 0.01
    discriminator_label_sigma: float = 7.5
    ellipses: int = 10
    ellipse_axis_mean: float = 1.5
    ellipse_axis_std: float = 3.0
    ellipse_axis_min: float = 1.5

    def __post_init__(self):
        self.vae_config()  # the VAE's own checks
        if int(self.vae_steps) != self.vae_steps or self.vae_steps < 0:
            raise ValueError(f"vae_steps must be an int >= 0, not {self.vae_steps!r}")
        for name in ("beta_rec", "beta_kl", "l1_weight", "style_weight", "perceptual_weight", "adversarial_weight",
                     "mask_grow_level", "ellipse_axis_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        for name in ("mask_blur_sigma", "perceptual_sigma", "discriminator_label_sigma", "ellipse_axis_mean",
                     "ellipse_axis_min", "clahe_clip_limit"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
        for name in ("mask_threshold", "training_mask_threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if not 0 < self.mask_threshold_percentile < 100:
            raise ValueError(f"mask_threshold_percentile must be in (0, 100), not {self.mask_threshold_percentile}")
        if self.perceptual_network not in PERCEPTUAL_NETWORKS:
            raise ValueError(f"perceptual_network must be one of {', '.join(PERCEPTUAL_NETWORKS)}, "
                             f"not {self.perceptual_network!r}")
        if len(self.generator_channels) != 3 or any(c < 1 for c in self.generator_channels):
            raise ValueError(f"generator_channels needs 3 positive widths, not {self.generator_channels}")
        if not self.aot_rates or any(r < 1 for r in self.aot_rates):
            raise ValueError(f"aot_rates needs positive dilations, not {self.aot_rates}")
        if self.generator_channels[2] % len(self.aot_rates):
            raise ValueError(f"the generator's last width ({self.generator_channels[2]}) must split into "
                             f"{len(self.aot_rates)} AOT branches")
        if self.aot_blocks < 1:
            raise ValueError(f"aot_blocks must be at least 1, not {self.aot_blocks}")
        if len(self.discriminator_channels) < 2 or any(c < 1 for c in self.discriminator_channels):
            raise ValueError(
                f"discriminator_channels needs at least 2 positive widths, not {self.discriminator_channels}")
        if self.ellipses < 0:
            raise ValueError(f"ellipses must be 0 or more, not {self.ellipses}")

    def vae_config(self) -> VAEConfig:
        """Stage (a)'s network settings as our VAE's (``beta`` there is unused here)."""
        return VAEConfig(channels=self.channels, strides=self.strides, latent_size=self.latent_size,
                         num_res_units=self.num_res_units, loss=self.loss)


# --------------------------------------------------------------------------- image operations


def gaussian_blur(images: torch.Tensor, sigma: float, mode: str = "reflect",
                  truncate: float = SMOOTH_TRUNCATE) -> torch.Tensor:
    """Each 2D image of (B, C, H, W) smoothed by a Gaussian of ``sigma`` pixels, as
    ``scipy.ndimage.gaussian_filter(image, sigma)`` (mode "reflect", truncate 4) or with zeros
    outside (mode "constant"). Scoring's filter engine does it (``scoring.filters``), so the
    blurs here and the smoothing of the scores are one implementation."""
    batch, channels, height, width = images.shape
    flat = images.reshape(batch * channels, height, width)
    return gaussian_filter(flat, sigma, (0, 1), truncate, mode).reshape(batch, channels, height, width)


def equalize_adaptive(images: torch.Tensor, clip_limit: float = 0.01) -> torch.Tensor:
    """CLAHE of each slice (B, 1, H, W): ``skimage.exposure.equalize_adapthist`` with its
    defaults (tiles of 1/8 of each side, 256 bins), on the CPU; the result comes back to the
    input's device. skimage stretches each slice to its own min-max first."""
    from skimage import exposure

    values = images.detach().to("cpu", torch.float32).numpy()
    equalised = np.stack([exposure.equalize_adapthist(value[0], clip_limit=clip_limit) for value in values])
    return torch.from_numpy(equalised[:, None].astype(np.float32)).to(images.device, images.dtype)


def normalise_95(residual: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each slice's map divided by its own 95th percentile (linear interpolation), clipped at 1."""
    percentile = torch.quantile(residual.flatten(1), 0.95, dim=1)
    return (residual / (percentile.view(-1, *([1] * (residual.ndim - 1))) + eps)).clamp(max=1.0)


def anomaly_mask(scores: torch.Tensor, threshold: float, blur_sigma: float = 1.2,
                 grow_level: float = 0.1) -> torch.Tensor:
    """Binarise at ``threshold`` (1 above it), blur by ``blur_sigma`` and set every pixel above
    ``grow_level`` to 1, the rest to 0: the mask grows by a pixel or two around each region."""
    binary = (scores > threshold).to(scores.dtype)
    return (gaussian_blur(binary, blur_sigma) > grow_level).to(scores.dtype)


# --------------------------------------------------------------------------- the GAN's losses
# (its networks, AOT-GAN's generator and discriminator, are in ``models.inpainting``)


def _detached(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach() for name, parameter in module.named_parameters()}


def _gram(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[1] / flat.shape[2]


# --------------------------------------------------------------------------- the perceptual network


def _load_lpips():
    """LPIPS (SqueezeNet, spatial) if the package and torchvision's ImageNet weights are both
    already here; this plugin never downloads them."""
    try:
        import lpips
        import torchvision  # noqa: F401
        from torchvision.models import SqueezeNet1_1_Weights
    except ImportError as error:
        raise ValueError(
            f"perceptual_network='lpips' needs the lpips and torchvision packages, which are not installed "
            f"({error}); use perceptual_network='encoder' (the default), which ships with the model"
        ) from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(SqueezeNet1_1_Weights.IMAGENET1K_V1.url).name
    if not weights.is_file():
        raise ValueError(
            f"perceptual_network='lpips' needs torchvision's ImageNet SqueezeNet weights at {weights}, which are "
            "not there (they are never downloaded here); use perceptual_network='encoder' (the default)"
        )
    network = lpips.LPIPS(net="squeeze", spatial=True, verbose=False).eval()
    network.requires_grad_(False)
    return network


class _CoarseVAE(VariationalCoding, nn.Module):
    """Stage (a): our VAE network with VariationalCoding's encode / decode / sample_latent."""

    def __init__(self, config: VAEConfig, in_plane: tuple[int, int]):
        super().__init__()
        self.network = variational_network(2, in_plane, config)


# --------------------------------------------------------------------------- the model


class PHANES(ReconstructionModel):
    """The VAE (``vae``), the inpainting generator (``generator``) and its discriminator
    (``discriminator``), with a step counter (``steps_done``) that picks the training stage."""

    kind = "phanes"
    config_class = PHANESConfig
    uses_noise_level = False
    samples_differ = False
    extra_maps = ("mask", "perceptual")
    # The paper's anomaly map: the residual weighed by the perceptual map (``phanes_score``).
    default_scorer = "phanes"

    def __init__(self, config: PHANESConfig = PHANESConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        height, width = spec.in_plane
        downsampling = math.prod(config.strides)
        if height % downsampling or width % downsampling:
            raise ValueError(f"the VAE's strides downsample by {downsampling}, which must divide the slice size "
                             f"{height}×{width}; change strides or the model space's in_plane")
        if height % 4 or width % 4 or min(height, width) // 4 <= max(config.aot_rates):
            raise ValueError(f"the inpainting generator needs slices divisible by 4 whose quarter exceeds the "
                             f"largest dilation {max(config.aot_rates)}, not {height}×{width}")
        self.vae = _CoarseVAE(config.vae_config(), spec.in_plane)
        self.generator = InpaintingGenerator(config.generator_channels, config.aot_blocks, config.aot_rates)
        self.discriminator = PatchDiscriminator(config.discriminator_channels)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # The inference mask threshold measured on healthy training slices (mask_threshold None);
        # NaN until stage (c) starts.
        self.register_buffer("measured_mask_threshold", torch.full((), float("nan")))
        # Not a submodule: its fixed weights stay out of checkpoints and of the optimizer.
        self._lpips = [_load_lpips()] if config.perceptual_network == "lpips" else []

    # ----------------------------------------------------------------- the stage schedule

    @property
    def stage(self) -> str:
        """"vae" for the first ``vae_steps`` training steps, then "inpainting"."""
        return STAGES[0] if int(self.steps_done) < self.config.vae_steps else STAGES[1]

    def training_loss(self, slices, brain_mask=None, generator=None):
        """The current stage's loss (see the module docstring); a call in training mode counts
        as one step (``brain_mask`` unused)."""
        stage = self.stage
        if self.training:
            self.steps_done += 1
        if stage == "vae":
            return self.vae_loss(slices, generator)
        if self.training and self.config.mask_threshold is None and torch.isnan(self.measured_mask_threshold):
            # Stage (a) is over: the paper's threshold, on these healthy slices.
            self.measured_mask_threshold.fill_(healthy_mask_threshold(
                self, slices, self.config.mask_threshold_percentile, brain_mask))
        return self.inpainting_loss(slices, generator)

    @property
    def inference_mask_threshold(self) -> float:
        """The threshold that binarises the mask at test time: the configured one, else the one
        measured on healthy slices (else, for a model that never reached stage (c), the configured
        training threshold scaled back by the code's ratio, or the code's 0.153)."""
        if self.config.mask_threshold is not None:
            return float(self.config.mask_threshold)
        measured = float(self.measured_mask_threshold)
        if not math.isnan(measured):
            return measured
        if self.config.training_mask_threshold is not None:
            return float(self.config.training_mask_threshold) / TRAINING_THRESHOLD_RATIO
        return CODE_INFERENCE_THRESHOLD

    @property
    def training_mask_threshold(self) -> float:
        """The threshold that binarises stage (b)'s mask for the GAN's training masks: the
        configured one, else the inference threshold × :data:`TRAINING_THRESHOLD_RATIO`, so both
        are on the scale of the perceptual network in use."""
        if self.config.training_mask_threshold is not None:
            return float(self.config.training_mask_threshold)
        return self.inference_mask_threshold * TRAINING_THRESHOLD_RATIO

    # ----------------------------------------------------------------- (a) the VAE

    def vae_loss(self, slices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """beta_rec·(per-pixel error) + beta_kl·KL/(H·W), on a sample of the posterior."""
        mu, logvar = self.vae.encode(slices)
        reconstruction = self.vae.decode(self.vae.sample_latent(mu, logvar, generator))
        pixels = slices[0].numel()
        return (self.config.beta_rec * reconstruction_error(reconstruction, slices, self.config.loss)
                + self.config.beta_kl * kl_divergence(mu, logvar) / pixels)

    def coarse(self, slices: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """x_cph in [0, 1]: the decoded posterior mean, or a posterior sample (``sample``, as in training)."""
        mu, logvar = self.vae.encode(slices)
        z = self.vae.sample_latent(mu, logvar, generator) if sample else mu
        return self.vae.decode(z).clamp(0.0, 1.0)

    def encoder_features(self, images: torch.Tensor, frozen: bool = True) -> list[torch.Tensor]:
        """The VAE encoder's feature maps at every level; ``frozen``: with detached weights, so
        gradients reach the images but never the encoder."""
        features, x = [], images
        for level in self.vae.network.encode:
            x = functional_call(level, _detached(level), (x,)) if frozen else level(x)
            features.append(x)
        return features

    # ----------------------------------------------------------------- (b) the mask

    def perceptual_map(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """S_perc(image, reference) per pixel (B, 1, H, W), Gaussian-smoothed (``perceptual_sigma``)."""
        if self._lpips:
            network = self._lpips[0].to(image.device)
            distance = network(2 * image - 1, 2 * reference - 1)
        else:
            size = image.shape[-2:]
            levels = []
            for a, b in zip(self.encoder_features(image), self.encoder_features(reference)):
                level = 1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)
                levels.append(F.interpolate(level[:, None], size=size, mode="bilinear", align_corners=False))
            distance = torch.stack(levels).mean(dim=0)
        return gaussian_blur(distance, self.config.perceptual_sigma)

    def mask_scores(self, slices: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """norm95(|eq(x_cph) − eq(x)|) · S_perc: the mask's scores before the threshold."""
        equalised_coarse = equalize_adaptive(coarse, self.config.clahe_clip_limit)
        equalised = equalize_adaptive(slices, self.config.clahe_clip_limit)
        residual = normalise_95((equalised_coarse - equalised).abs())
        if self.config.mask_perceptual_on_equalised:
            return residual * self.perceptual_map(equalised_coarse, equalised)
        return residual * self.perceptual_map(coarse, slices)

    def anomaly_mask(self, slices: torch.Tensor, coarse: torch.Tensor, threshold: float) -> torch.Tensor:
        return anomaly_mask(self.mask_scores(slices, coarse), threshold, self.config.mask_blur_sigma,
                            self.config.mask_grow_level)

    def random_masks(self, slices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each slice's ``ellipses`` random ellipses as one mask (B, 1, H, W)."""
        batch, _, height, width = slices.shape
        if not self.config.ellipses:
            return torch.zeros_like(slices)
        ellipses = random_ellipses(batch, (height, width), self.config.ellipses, self.config.ellipse_axis_mean,
                                   self.config.ellipse_axis_std, self.config.ellipse_axis_min, generator, slices.device)
        return rasterise_ellipses(ellipses.to(slices.dtype), (height, width))

    # ----------------------------------------------------------------- (c) inpainting

    @staticmethod
    def generator_input(slices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked slice the generator reads: masked pixels set to 1."""
        return slices * (1 - mask) + mask

    def inpaint(self, slices: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's whole output and the composite x⊙(1−m) + G⊙m."""
        prediction = self.generator(self.generator_input(slices, mask), mask)
        return prediction, slices * (1 - mask) + prediction * mask

    def inpainting_losses(self, slices: torch.Tensor, prediction: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1, style (Gram matrices) and perceptual (features) differences between the
        generator's output and the slice, on the frozen encoder's features at every level."""
        with torch.no_grad():
            targets = self.encoder_features(slices)
        predicted = self.encoder_features(prediction)
        return {
            "l1": F.l1_loss(prediction, slices),
            "style": sum(F.l1_loss(_gram(p), _gram(t)) for p, t in zip(predicted, targets)),
            "perceptual": sum(F.l1_loss(p, t) for p, t in zip(predicted, targets)),
        }

    def adversarial_losses(self, slices: torch.Tensor, composite: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator loss, generator's adversarial term), least squares on outputs
        up-sampled to the slice. The discriminator learns the blurred mask on the composite
        (detached: no gradient to the generator) and 0 on the slice; the generator's term,
        (D(composite) − 1)² weighted by the mask (AOT-GAN's SM-GAN), goes through the
        discriminator with detached weights (no gradient to the discriminator)."""
        size = slices.shape[-2:]

        def judge(images, weights=None):
            if weights is None:
                out = self.discriminator(images)
            else:
                out = functional_call(self.discriminator, weights, (images,))
            return F.interpolate(out, size=size, mode="bilinear", align_corners=True)

        target = gaussian_blur(mask, self.config.discriminator_label_sigma, mode="constant")
        discriminator = F.mse_loss(judge(composite.detach()), target) + judge(slices).pow(2).mean()
        fooled = (judge(composite, _detached(self.discriminator)) - 1).pow(2)
        adversarial = (fooled * mask).mean() / mask.mean().clamp_min(1e-8)
        return discriminator, adversarial

    def training_masks(self, slices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stage (b)'s mask at the training threshold, united with the random ellipses."""
        with torch.no_grad():
            coarse = self.coarse(slices, generator, sample=True)
            found = self.anomaly_mask(slices, coarse, self.training_mask_threshold)
            return torch.maximum(found, self.random_masks(slices, generator))

    def inpainting_loss(self, slices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stage (c): the generator's weighted losses plus, in training mode, its adversarial term
        and the discriminator's loss (see the module docstring)."""
        mask = self.training_masks(slices, generator)
        prediction, composite = self.inpaint(slices, mask)
        terms = self.inpainting_losses(slices, prediction)
        config = self.config
        loss = (config.l1_weight * terms["l1"] + config.style_weight * terms["style"]
                + config.perceptual_weight * terms["perceptual"])
        if not self.training:
            return loss
        discriminator, adversarial = self.adversarial_losses(slices, composite, mask)
        return loss + config.adversarial_weight * adversarial + discriminator

    # ----------------------------------------------------------------- reconstruction

    @torch.no_grad()
    def reconstruct_with_maps(self, slices, t=None, generator=None):
        """x_ph and the maps "mask" (m at :attr:`inference_mask_threshold`) and "perceptual" (S_perc(x_ph, x));
        deterministic (the posterior mean), ``t`` and ``generator`` are ignored."""
        coarse = self.coarse(slices)
        mask = self.anomaly_mask(slices, coarse, self.inference_mask_threshold)
        prediction = self.generator(self.generator_input(slices, mask), mask).clamp(0.0, 1.0)
        pseudo_healthy = slices * (1 - mask) + prediction * mask
        return pseudo_healthy, {"mask": mask, "perceptual": self.perceptual_map(pseudo_healthy, slices)}

    def reconstruct(self, slices, t=None, generator=None):
        return self.reconstruct_with_maps(slices, t, generator)[0]


@torch.no_grad()
def healthy_mask_threshold(model: PHANES, slices: torch.Tensor, percentile: float = 99.0,
                           brain_mask: torch.Tensor | None = None) -> float:
    """The paper's binarisation threshold: the ``percentile`` of the mask scores on healthy
    (validation) slices, within ``brain_mask`` when given. Use it as ``mask_threshold``."""
    was_training = model.training
    model.eval()
    try:
        scores = model.mask_scores(slices, model.coarse(slices))
    finally:
        model.train(was_training)
    values = scores[brain_mask.bool()] if brain_mask is not None else scores.flatten()
    return float(np.percentile(values.cpu().numpy(), percentile))


# --------------------------------------------------------------------------- PHANES's score
# The kind owns its score: defined here and registered with scoring's registry when this module
# is imported (``scoring.registry`` explains why the registry, in turn, imports the kinds).


def phanes_score(
    image: ArrayLike,
    reconstruction: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    maps: Mapping[str, ArrayLike],
) -> ArrayLike:
    """PHANES's anomaly map: |x − x_ph| · S_perc(x_ph, x), the residual to the pseudo-healthy
    reconstruction times the model's perceptual difference map ("perceptual"). 0 outside ``mask``."""
    device = device_of(image, reconstruction)
    difference = as_tensor(absolute_residual(image, reconstruction), "residual", device, work_dtype(image))
    perceptual = as_tensor(maps["perceptual"], "perceptual", device, difference.dtype)
    if perceptual.shape != difference.shape:
        raise ValueError(f"perceptual has shape {tuple(perceptual.shape)}, the image {tuple(difference.shape)}")
    combined = difference * perceptual
    region = as_mask(mask, tuple(combined.shape), device)
    if region is not None:
        combined = torch.where(region, combined, torch.zeros((), dtype=combined.dtype, device=device))
    return output_like(combined, image)


register_scorer(Scorer(
    "phanes", phanes_score, "reconstruction",
    "PHANES: |x − x̂| × the model's perceptual difference map S_perc(x̂, x)",
    # The paper's map as it is: it is exactly 0 outside the inpainted region, which
    # a 5³ median would erase where it is 4 mm thick or less.
    {}, needs_maps=("perceptual",), median_filtered=False, brain_eroded=False,
))
