"""SADM: a frozen reconstruction model plus a segmentation network trained on synthetic anomalies.

Behrendt et al., "Combining reconstruction-based unsupervised anomaly detection with supervised
segmentation for brain MRIs" (thesis sec. 3.4.6, 4.4 and ch. 8.6; code
FinnBehrendt/Supervised-Anomaly-Detection-with-Diffusion-Models).

- **Stage I** is any reconstruction model we ship (the paper: a cDDPM on healthy T1). It is
  frozen: its weights are copied into this model's ``base`` and never trained again, so one
  checkpoint holds both stages.
- **Stage II** is a Siamese U-Net (SADM_res, the paper's best variant): one encoder reads the
  residual x − x̂ and, separately, the input x; "the resulting feature maps are then concatenated
  along the channel dimension at each layer and passed to the decoder, effectively doubling the
  channel dimensions. A sigmoid layer is added after the final convolution". Group norm and
  SiLU. The paper: 3 levels of 64/128/256 channels and cross-entropy; the authors' code: 4 levels
  of 64…512 and BCE-with-logits (the default here; the two losses are the same for one sigmoid
  output).
- **Training data** from healthy slices only, DRAEM-style (Zavrtanik et al. 2021, thesis
  appendix C): Perlin noise at a scale of 2^U{0..6} cells per axis, binarised (paper: "a
  uniformly sampled threshold"; code: 0.5, the default) and kept inside the brain, is the ground
  truth M. The anomaly's texture comes from Perlin noise, not from the slice (the paper: "the
  binary map is further processed by three random augmentation functions"; the authors' code
  uses the noise as the anomaly source): a second field at the same scale (the first one's
  values inside M all lie near its top, and would saturate), stretched to [0, 1], goes through three
  random intensity augmentations from {posterize, sharpness, solarize, equalize, brightness,
  contrast (the grey-value "colour change"), auto-contrast}, giving I_aug; the anomalous slice
  is I_syn = (1 − M)·I + (1 − β)·(M ⊙ I) + β·(M ⊙ I_aug), β ~ U[0.2, 1]. So at β = 1 what fills
  M does not depend on the anatomy under it, and a flat slice still gets textured anomalies. As
  in DRAEM's code, half of the slices get no anomaly (an empty mask), so the network also learns
  to say "nothing".
- **Training on patients' scans**: voxels of a training list's exclusion mask (real lesions)
  count for nothing in the loss, so the network is never taught that a real lesion is healthy.
  The frozen base reconstructs the anomalous slice (at one noise level of the test ensemble,
  drawn per batch, for a diffusion base).
- **Test**: reconstructions and segmentations averaged over t = 250/500/750 (one level for an
  autoencoder base, which has no noise level); the score is (1 − SSIM σ = 1) + segmentation
  (the ``ssim+segmentation`` scorer, defined at the end of this module and registered with
  ``scoring``; its ``weight`` β gives β·x̃ + (1 − β)·ŷ; ``residual+segmentation`` puts the
  residual in place of 1 − SSIM). It is the kind's default scorer.

**Semi-supervised** (``supervision = "labelled"``, the paper's second setting): stage II learns
real lesions drawn by hand instead of synthetic anomalies. The training list's lesion masks
(its ``exclude_mask`` column, taken as drawn: not grown) are the targets; every pixel of every
slice counts, so the network also learns what is not a lesion. Its results are supervised ones
and are reported apart from the unsupervised models'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import ModelSpaceSpec
from ..scoring import Scorer, register_scorer, residual, ssim_map
from ..scoring.arrays import ArrayLike, as_mask, as_tensor, device_of, output_like, work_dtype
from ..scoring.registry import SSIM_PARAMS
from .base import (
    DenoisingParts,
    ModelConfig,
    ReconstructionModel,
    random_integers,
    random_permutation,
    random_uniform,
)
from .ddpm import noise_levels
from .registry import build_model

SUPERVISIONS = ("synthetic", "labelled")

__all__ = [
    "SADM",
    "SADMConfig",
    "SiameseUNet",
    "TEXTURE_AUGMENTATIONS",
    "blend_anomaly",
    "perlin_noise_2d",
    "residual_and_segmentation",
    "segmentation_term",
    "ssim_and_segmentation",
    "synthetic_anomalies",
]


@dataclass(frozen=True)
class SADMConfig(ModelConfig):
    """Stage II's hyper-parameters, and which stage-I model it sits on.

    ``base_kind`` and ``base_hyperparameters`` describe the frozen reconstruction model; the
    training module fills them from the ``--base-model`` checkpoint. ``use_residual`` False is
    the paper's plain SADM (the U-Net reads only the input)."""

    base_kind: str = "dae"
    base_hyperparameters: dict = field(default_factory=dict)
    channels: tuple[int, ...] = (64, 128, 256, 512)
    norm_num_groups: int = 8
    use_residual: bool = True
    t_test: tuple[int, ...] = (250, 500, 750)
    perlin_scale_exponents: tuple[int, int] = (0, 6)
    perlin_threshold: float | None = 0.5  # None: uniformly sampled per slice (the paper)
    opacity: tuple[float, float] = (0.2, 1.0)
    anomaly_probability: float = 0.5
    augmentations_per_texture: int = 3
    # "synthetic": DRAEM-style anomalies in healthy slices; "labelled": real lesion masks.
    supervision: str = "synthetic"

    def __post_init__(self):
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least 2 positive levels, not {self.channels}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count must divide into {self.norm_num_groups} groups: {self.channels}")
        low, high = self.perlin_scale_exponents
        if not 0 <= low <= high:
            raise ValueError(f"perlin_scale_exponents must be 0 <= low <= high, not {self.perlin_scale_exponents}")
        if self.perlin_threshold is not None and not -1 < self.perlin_threshold < 1:
            raise ValueError(f"perlin_threshold must be in (-1, 1), not {self.perlin_threshold}")
        if not 0 <= self.opacity[0] <= self.opacity[1] <= 1:
            raise ValueError(f"opacity must be 0 <= low <= high <= 1, not {self.opacity}")
        if not 0 <= self.anomaly_probability <= 1:
            raise ValueError(f"anomaly_probability must be in [0, 1], not {self.anomaly_probability}")
        if not 1 <= self.augmentations_per_texture <= len(TEXTURE_AUGMENTATIONS):
            raise ValueError(f"augmentations_per_texture must be 1 to {len(TEXTURE_AUGMENTATIONS)}")
        if not self.t_test:
            raise ValueError("t_test needs at least one noise level")
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {', '.join(SUPERVISIONS)}, not {self.supervision!r}")


# --------------------------------------------------------------------------- synthetic anomalies


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade 6t⁵ − 15t⁴ + 10t³ (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise_2d(shape: tuple[int, int], cells: tuple[int, int], generator=None, device="cpu") -> torch.Tensor:
    """One field of 2D Perlin gradient noise on ``shape`` pixels with ``cells`` lattice cells per axis.

    Random unit gradients sit on the (cells + 1)² lattice points; each pixel blends the dot
    products with its cell's four corners by the fade curve, and the sum is scaled by √2 so that
    the field lies within ±1 (DRAEM's convention, to which its threshold 0.5 refers). It is 0 on
    lattice points."""
    height, width = shape
    rows, cols = cells
    angles = random_uniform((rows + 1, cols + 1), generator, device, 0.0, 2 * math.pi)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    y = torch.arange(height, device=device, dtype=torch.float32) * rows / height
    x = torch.arange(width, device=device, dtype=torch.float32) * cols / width
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return math.sqrt(2) * (top * (1 - wy) + bottom * wy)


def _posterize(image, generator):
    levels = 2 ** int(random_integers(2, 6, (1,), generator, image.device))
    return torch.floor(image * (levels - 1) + 0.5) / (levels - 1)


def _sharpness(image, generator):
    blur = F.avg_pool2d(F.pad(image[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
    amount = float(random_uniform((1,), generator, image.device, 0.5, 2.0))
    return (image + amount * (image - blur)).clamp(0, 1)


def _solarize(image, generator):
    threshold = float(random_uniform((1,), generator, image.device, 0.3, 0.8))
    return torch.where(image >= threshold, 1 - image, image)


def _equalize(image, generator):
    # Histogram equalisation: each value becomes its rank among the slice's values.
    ranks = torch.argsort(torch.argsort(image.flatten())).to(image.dtype)
    return (ranks / max(image.numel() - 1, 1)).reshape(image.shape)


def _brightness(image, generator):
    return (image * float(random_uniform((1,), generator, image.device, 0.5, 1.5))).clamp(0, 1)


def _contrast(image, generator):
    mean = image.mean()
    factor = float(random_uniform((1,), generator, image.device, 0.5, 2.0))
    return ((image - mean) * factor + mean).clamp(0, 1)


def _autocontrast(image, generator):
    # Stretch the 1st-99th percentile to [0, 1] (PIL's auto-contrast with a 1 % cut-off); a
    # plain min-max stretch would leave a model-space slice, already 0 to 1, unchanged.
    low, high = torch.quantile(image.flatten(), torch.tensor([0.01, 0.99], dtype=image.dtype, device=image.device))
    return ((image - low) / (high - low)).clamp(0, 1) if high > low else image


TEXTURE_AUGMENTATIONS: dict[str, Callable] = {
    "posterize": _posterize,
    "sharpness": _sharpness,
    "solarize": _solarize,
    "equalize": _equalize,
    "brightness": _brightness,
    "contrast": _contrast,
    "autocontrast": _autocontrast,
}
"""DRAEM's texture augmentations for a grey-value slice (H, W) in [0, 1]; three are drawn per slice."""


def blend_anomaly(image: torch.Tensor, texture: torch.Tensor, mask: torch.Tensor, opacity) -> torch.Tensor:
    """I_syn = (1 − M)·I + (1 − β)·(M ⊙ I) + β·(M ⊙ I_aug) (thesis appendix C)."""
    mask = mask.to(image.dtype)
    return (1 - mask) * image + (1 - opacity) * (mask * image) + opacity * (mask * texture)


def _stretch(field: torch.Tensor) -> torch.Tensor:
    """The field's values mapped linearly onto [0, 1] (a constant field gives 0.5)."""
    low, high = field.min(), field.max()
    return (field - low) / (high - low) if high > low else torch.full_like(field, 0.5)


def synthetic_anomalies(
    slices: torch.Tensor, brain_mask: torch.Tensor | None, config: SADMConfig, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy slices (B, 1, H, W) in [0, 1] with DRAEM-style anomalies, and their masks (float 0/1).

    Each anomaly's region is where a Perlin field exceeds the threshold; its texture is a second
    field at the same scale, stretched to [0, 1] and augmented: never the slice itself."""
    batch, _, height, width = slices.shape
    device = slices.device
    anomalous, masks = slices.clone(), torch.zeros_like(slices)
    low, high = config.perlin_scale_exponents
    names = list(TEXTURE_AUGMENTATIONS)
    for index in range(batch):
        draw = random_uniform((2,), generator, device)
        if float(draw[0]) >= config.anomaly_probability:
            continue
        exponents = random_integers(low, high + 1, (2,), generator, device)
        cells = (2 ** int(exponents[0]), 2 ** int(exponents[1]))
        noise = perlin_noise_2d((height, width), cells, generator, device)
        threshold = (config.perlin_threshold if config.perlin_threshold is not None
                     else float(random_uniform((1,), generator, device, 0.1, 0.6)))
        mask = noise > threshold
        if brain_mask is not None:
            mask &= brain_mask[index, 0].bool()
        image = slices[index, 0]
        # A second field at the same scale: its values span the whole range inside the mask,
        # where the first one's lie near its top.
        texture = _stretch(perlin_noise_2d((height, width), cells, generator, device))
        order = random_permutation(len(names), generator, device)
        for choice in order[: config.augmentations_per_texture].tolist():
            texture = TEXTURE_AUGMENTATIONS[names[choice]](texture, generator)
        opacity = float(random_uniform((1,), generator, device, *config.opacity))
        anomalous[index, 0] = blend_anomaly(image, texture, mask, opacity)
        masks[index, 0] = mask.to(slices.dtype)
    return anomalous, masks


# --------------------------------------------------------------------------- Siamese U-Net


class _ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each with group norm and SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels), nn.SiLU(),
        )


class SiameseUNet(nn.Module):
    """A U-Net whose one encoder reads several images separately; the features of all of them
    are concatenated at every level (skips and bottleneck), so the decoder sees twice the
    channels for two inputs. The output is one logit per pixel."""

    def __init__(self, channels: Sequence[int], groups: int, inputs: int = 2):
        super().__init__()
        self.inputs = inputs
        self.encoder = nn.ModuleList(
            _ConvBlock(1 if level == 0 else channels[level - 1], width, groups) for level, width in enumerate(channels)
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(channels) - 1, 0, -1):
            below = inputs * channels[level] if level == len(channels) - 1 else channels[level]
            self.up.append(nn.ConvTranspose2d(below, channels[level - 1], 2, stride=2))
            self.decoder.append(_ConvBlock(channels[level - 1] + inputs * channels[level - 1], channels[level - 1], groups))
        self.head = nn.Conv2d(channels[0], 1, 1)

    @property
    def levels(self) -> int:
        return len(self.encoder)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features of one image at every level (full size, then halved at each level)."""
        features, x = [], image
        for level, block in enumerate(self.encoder):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            features.append(x)
        return features

    def joint_features(self, *images: torch.Tensor) -> list[torch.Tensor]:
        """Each image through the shared encoder; their features concatenated level by level."""
        if len(images) != self.inputs:
            raise ValueError(f"this network reads {self.inputs} images, not {len(images)}")
        per_image = [self.encode(image) for image in images]
        return [torch.cat([features[level] for features in per_image], dim=1) for level in range(self.levels)]

    def decode(self, joint: list[torch.Tensor]) -> torch.Tensor:
        x = joint[-1]
        for step, (up, block) in enumerate(zip(self.up, self.decoder)):
            skip = joint[-2 - step]
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.joint_features(*images))

    def encoder_parameters(self):
        return self.encoder.parameters()

    def decoder_parameters(self):
        return [*self.up.parameters(), *self.decoder.parameters(), *self.head.parameters()]


# --------------------------------------------------------------------------- the model


class SADM(ReconstructionModel):
    """A frozen stage-I reconstruction model (``base``) and the stage-II Siamese U-Net."""

    kind = "sadm"
    config_class = SADMConfig
    extra_maps = ("segmentation",)
    # The paper's score: its segmentation added to 1 − SSIM.
    default_scorer = "ssim+segmentation"
    needs_base_model = True
    excludes_voxels = True

    def __init__(self, config: SADMConfig = SADMConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        if config.base_kind == self.kind:
            raise ValueError("a SADM cannot sit on another SADM")
        self.base = build_model(config.base_kind, config.base_hyperparameters, spec)
        if self.base.volumetric:
            raise ValueError(f"SADM works on slices; a {config.base_kind} base reconstructs whole volumes")
        self.base.requires_grad_(False)
        self.base.eval()
        if spec.in_plane[0] % 2 ** (len(config.channels) - 1) or spec.in_plane[1] % 2 ** (len(config.channels) - 1):
            raise ValueError(f"slices of {spec.in_plane} do not halve {len(config.channels) - 1} times")
        self.segmenter = SiameseUNet(config.channels, config.norm_num_groups, inputs=2 if config.use_residual else 1)
        # What the base does with noise decides what this model does with it.
        self.uses_noise_level = self.base.uses_noise_level
        self.samples_differ = self.base.samples_differ

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen: its norms and dropouts stay in inference mode
        return self

    def load_base(self, base: ReconstructionModel) -> None:
        """Copy a trained stage-I model's weights into ``base`` (they must be the same network)."""
        if base.kind != self.config.base_kind or base.config.to_dict() != self.base.config.to_dict():
            raise ValueError(f"the base model is a {base.kind} with other hyper-parameters than this SADM's")
        self.base.load_state_dict(base.state_dict())

    def _levels(self, t) -> list[int | None]:
        """The base's noise levels to average over (default: the test ensemble), checked against
        its schedule; one pass without a level for a base that has none."""
        if not self.base.uses_noise_level:
            return [None]
        return noise_levels(self.config.t_test if t is None else t, self.base.config)

    def segmentation_logits(self, slices: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        if self.config.use_residual:
            return self.segmenter(slices - reconstruction, slices)
        return self.segmenter(slices)

    def denoising_parts(self) -> DenoisingParts:
        """The segmentation U-Net as a noise predictor for ADDP's pre-training: the noised slice
        goes into every input branch (healthy slices have no residual to speak of)."""
        segmenter = self.segmenter
        return DenoisingParts(lambda noised: segmenter(*[noised] * segmenter.inputs),
                              list(segmenter.encoder_parameters()), segmenter.decoder_parameters())

    @property
    def labelled(self) -> bool:
        """Whether stage II learns real lesion masks (semi-supervised) rather than synthetic anomalies."""
        return self.config.supervision == "labelled"

    def training_loss(self, slices, brain_mask=None, generator=None, excluded=None):
        """BCE of the segmentation; the base reconstructs without gradients.

        Self-supervised: of synthetic anomalies, averaged over the pixels outside ``excluded``
        (real lesions in a patient's slice are neither healthy nor synthetic). Labelled: of the
        real lesions ``excluded`` marks (the training list's lesion masks), over every pixel."""
        if self.labelled:
            if excluded is None:
                raise ValueError("a labelled SADM learns real lesions: it needs the training list's lesion masks")
            anomalous, masks = slices, excluded.to(device=slices.device, dtype=slices.dtype)
            excluded = None
        else:
            anomalous, masks = synthetic_anomalies(slices, brain_mask, self.config, generator)
        levels = self._levels(None)
        level = levels[int(random_integers(0, len(levels), (1,), generator, slices.device))]
        with torch.no_grad():
            reconstruction = self.base.reconstruct(anomalous, level, generator)
        logits = self.segmentation_logits(anomalous, reconstruction)
        if excluded is None:
            return F.binary_cross_entropy_with_logits(logits, masks)
        per_pixel = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
        kept = (~excluded.to(device=per_pixel.device, dtype=torch.bool)).to(per_pixel.dtype)
        return (per_pixel * kept).sum() / kept.sum().clamp_min(1.0)

    @torch.no_grad()
    def reconstruct_with_maps(self, slices, t=None, generator=None):
        reconstructions, segmentations = [], []
        for level in self._levels(t):
            reconstruction = self.base.reconstruct(slices, level, generator)
            reconstructions.append(reconstruction)
            segmentations.append(torch.sigmoid(self.segmentation_logits(slices, reconstruction)))
        mean = torch.stack(reconstructions).mean(dim=0)
        return mean, {"segmentation": torch.stack(segmentations).mean(dim=0)}

    def reconstruct(self, slices, t=None, generator=None):
        return self.reconstruct_with_maps(slices, t, generator)[0]


# --------------------------------------------------------------------------- SADM's score
# The kind owns its score: defined here and registered with scoring's registry when this module
# is imported (``scoring.registry`` explains why the registry, in turn, imports the kinds).


def ssim_and_segmentation(
    image: ArrayLike,
    reconstruction: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    maps: Mapping[str, ArrayLike],
    sigma: float = 1.0,
    data_range: float | None = None,
    weight: float | None = None,
) -> ArrayLike:
    """SADM's score: (1 − SSIM(x, x̂), window σ) + ŷ, the segmentation network's output.

    ``weight`` β gives the weighted form β·(1 − SSIM) + (1 − β)·ŷ instead of the plain sum
    (thesis sec. 8.6). 0 outside ``mask``."""
    dissimilarity = 1 - as_tensor(ssim_map(image, reconstruction, sigma=sigma, data_range=data_range, mask=mask),
                                  "ssim", device_of(image, reconstruction), work_dtype(image))
    return _plus_segmentation(dissimilarity, image, mask, maps, weight)


def residual_and_segmentation(
    image: ArrayLike,
    reconstruction: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    maps: Mapping[str, ArrayLike],
    weight: float | None = None,
) -> ArrayLike:
    """SADM's combination with the residual |x − x̂| in place of 1 − SSIM: for a base model
    whose residual ranks lesions better than its SSIM (our DAE). 0 outside ``mask``."""
    error = as_tensor(residual(image, reconstruction), "residual", device_of(image, reconstruction),
                      work_dtype(image))
    return _plus_segmentation(error, image, mask, maps, weight)


def _plus_segmentation(unsupervised: torch.Tensor, image, mask, maps, weight) -> ArrayLike:
    """unsupervised + ŷ, or β·unsupervised + (1 − β)·ŷ; 0 outside ``mask``."""
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be between 0 and 1, not {weight}")
    device = unsupervised.device
    segmentation = as_tensor(maps["segmentation"], "segmentation", device, unsupervised.dtype)
    if segmentation.shape != unsupervised.shape:
        raise ValueError(f"segmentation has shape {tuple(segmentation.shape)}, the image {tuple(unsupervised.shape)}")
    combined = (unsupervised + segmentation if weight is None
                else weight * unsupervised + (1 - weight) * segmentation)
    region = as_mask(mask, tuple(combined.shape), device)
    if region is not None:
        combined = torch.where(region, combined, torch.zeros((), dtype=combined.dtype, device=device))
    return output_like(combined, image)


def segmentation_term(maps: Mapping[str, ArrayLike], weight: float | None = None, **_) -> np.ndarray:
    """SADM's segmentation term of its score: ŷ, or (1 − β)·ŷ for the weighted form. The
    paper median-filters the unsupervised map only and adds this term after post-processing, so
    a predicted region one or two slices thick survives."""
    values = maps["segmentation"]
    segmentation = (values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values))
    segmentation = segmentation.astype(np.float32, copy=False)
    return segmentation if weight is None else np.float32(1 - weight) * segmentation


register_scorer(Scorer(
    "ssim+segmentation", ssim_and_segmentation, "reconstruction",
    "SADM: (1 − SSIM(x, x̂)) + the segmentation network's output, or β-weighted",
    {**SSIM_PARAMS, "weight": None}, needs_maps=("segmentation",), after_median=segmentation_term,
))
register_scorer(Scorer(
    "residual+segmentation", residual_and_segmentation, "reconstruction",
    "SADM with the residual: |x − x̂| + the segmentation network's output, or β-weighted",
    {"weight": None}, needs_maps=("segmentation",), after_median=segmentation_term,
))
