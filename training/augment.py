"""Augmentation of healthy training slices with MONAI transforms, as in the cDDPM paper.

The paper uses random blur (p = 0.25), bias field (p = 0.25), gamma (p = 0.5) and ghosting
(p = 0.5) from torchio. Blur, bias and gamma are MONAI transforms here; MONAI has no ghosting,
so :class:`RandGhosting` is ours. Ranges follow torchio's defaults where the paper names none:
blur σ up to 2 px, bias-field coefficients up to 0.5 (polynomial degree 3), log-gamma in ±0.3,
4–10 ghosts of strength 0.5–1. After augmenting, slices are clipped to [0, 1] and set to 0
outside the brain again, because that is what model space looks like at inference.

Beyond the paper, for scans from other scanners and protocols (all our healthy scans come
from one): a random monotone warp of the intensity curve (MONAI's histogram shift, 5-10
control points: how MPRAGE, spoiled gradient echo and spin-echo T1 map the same tissues to
other grey levels), Rician noise (std up to 0.05 of the [0, 1] range, as magnitude images
have), and a lower resolution along one in-plane axis (factor 1.5-3, as thick-slice or
anisotropic acquisitions give). These are off unless a config asks for them, so a model
trained before keeps its meaning.

The random state is set per step from (seed, step, rank), so runs are reproducible and a
resumed run augments as the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianSmooth,
    RandHistogramShift,
    RandomizableTransform,
    RandRicianNoise,
)


@dataclass(frozen=True)
class AugmentationSettings:
    blur_probability: float = 0.25
    bias_probability: float = 0.25
    gamma_probability: float = 0.5
    ghosting_probability: float = 0.5
    # Other scanners and protocols (see the module's text); off by default.
    histogram_probability: float = 0.0
    noise_probability: float = 0.0
    resolution_probability: float = 0.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")


class RandGhosting(RandomizableTransform):
    """MRI ghosting: copies of the image shifted along the phase-encoding axis.

    Motion or instability that repeats every n-th phase-encoding line modulates k-space with
    period n, which shows as n faint replicas of the anatomy spread along that axis. It is made
    here by scaling every n-th k-space line (but not the centre, which holds the image's
    contrast) by 1 - strength.
    """

    def __init__(self, prob: float = 0.5, ghosts: tuple[int, int] = (4, 10), strength: tuple[float, float] = (0.5, 1.0)):
        RandomizableTransform.__init__(self, prob)
        self.ghosts = ghosts
        self.strength = strength
        self._ghosts, self._strength, self._axis = ghosts[0], strength[0], 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._ghosts = int(self.R.randint(self.ghosts[0], self.ghosts[1] + 1))
        self._strength = float(self.R.uniform(*self.strength))
        self._axis = int(self.R.randint(0, 2))

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """``image`` (C, H, W)."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        image = torch.as_tensor(image)
        axis = image.ndim - 2 + self._axis
        spectrum = torch.fft.fftshift(torch.fft.fft2(image.to(torch.float64)), dim=(-2, -1))
        lines = torch.ones(image.shape[axis], dtype=torch.float64)
        lines[:: self._ghosts] = 1.0 - self._strength
        lines[image.shape[axis] // 2] = 1.0  # the k-space centre: keep the contrast
        shape = [1] * image.ndim
        shape[axis] = -1
        spectrum = spectrum * lines.reshape(shape)
        ghosted = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).abs()
        return ghosted.to(image.dtype)


class RandLowResolution(RandomizableTransform):
    """A slice as a coarser acquisition would give it: one in-plane axis averaged down by a
    factor of 1.5-3 and interpolated back (partial volume along that axis)."""

    def __init__(self, prob: float = 0.0, factor: tuple[float, float] = (1.5, 3.0)):
        RandomizableTransform.__init__(self, prob)
        self.factor = factor
        self._factor, self._axis = factor[0], 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._factor = float(self.R.uniform(*self.factor))
            self._axis = int(self.R.randint(0, 2))

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """``image`` (C, H, W)."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        image = torch.as_tensor(image)
        size = list(image.shape[-2:])
        coarse = list(size)
        coarse[self._axis] = max(2, int(round(size[self._axis] / self._factor)))
        low = torch.nn.functional.interpolate(image[None].float(), size=coarse, mode="area")
        return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)[0].to(image.dtype)


class SliceAugmenter:
    """Random blur, bias field, gamma and ghosting (and, when asked, intensity-curve warps, lower
    resolution and noise) for batches of model-space slices."""

    def __init__(self, settings: AugmentationSettings = AugmentationSettings()):
        self.settings = settings
        self.pipeline = Compose([
            RandGaussianSmooth(sigma_x=(0.0, 2.0), sigma_y=(0.0, 2.0), prob=settings.blur_probability),
            RandBiasField(degree=3, coeff_range=(0.0, 0.5), prob=settings.bias_probability),
            RandAdjustContrast(gamma=(float(np.exp(-0.3)), float(np.exp(0.3))), prob=settings.gamma_probability),
            RandGhosting(prob=settings.ghosting_probability),
            RandHistogramShift(num_control_points=(5, 10), prob=settings.histogram_probability),
            RandLowResolution(prob=settings.resolution_probability),
            RandRicianNoise(prob=settings.noise_probability, std=0.05, sample_std=True),
        ])

    def __call__(self, slices: torch.Tensor, brain_mask: torch.Tensor, seed: int) -> torch.Tensor:
        """Augmented copies of ``slices`` (B, 1, H, W) in [0, 1]; ``seed`` fixes every draw."""
        self.pipeline.set_random_state(seed=int(seed) % 2**32)
        augmented = torch.stack([_plain(self.pipeline(item)) for item in slices])
        return augmented.clamp(0.0, 1.0) * brain_mask


def _plain(image) -> torch.Tensor:
    """A plain float tensor (MONAI returns MetaTensors, which carry metadata training does not use)."""
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    return image.float()
