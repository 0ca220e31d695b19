"""mDDPM's training-time masking: image-patch (IPM), frequency-patch (FPM) and FPM-CutMix.

Iqbal et al., "Unsupervised Anomaly Detection in Medical Images Using Masked Diffusion Model"
(sec. 2.3). Before a healthy training slice is noised, a masking block corrupts part of it; the
network must still return the clean slice, so at test time it treats anomalies like masked
patches and replaces them with healthy tissue.

- IPM (eq. 6): ``z_I = z0 ⊙ M_I``; M_I is 0 on the chosen patches, so they become 0.
- FPM (eq. 7): ``z_F = IDFT(M_F ⊙ DFT(z0))``; M_F is a patch mask of the same kind laid on the
  (centred) Fourier spectrum, chosen at random: "we don't specify the high-frequency or
  low-frequency masking, rather MFM is performed randomly". The real part is kept, as the
  authors' code does (``np.real``); taking the real part of the inverse transform of a spectrum
  that is not conjugate-symmetric is the same as masking each frequency ``k`` by the mean of
  ``M_F(k)`` and ``M_F(-k)``, so the spectrum only changes at masked patches and their mirror
  images.
- FPM-CutMix (eq. 8): ``z_FC = z_I + z_F ⊙ ¬M_I``: the FPM-filtered image is pasted into the
  chosen image patches, the rest of the slice stays clean.

The masking ratio is drawn per slice, uniformly in ``ratio`` ("a masking ratio randomly varying
between 10%-90% of the whole foreground region", sec. 3.1). In the image domain that fraction
of the brain's patches is chosen: patches of a ``patch``×``patch`` grid that contain brain.
The spectrum has no foreground, so FPM masks that fraction of all spectrum patches.

Only brain pixels are ever changed. The paper applies the block "only to the foreground pixel
patches" (sec. 3.1) and the authors' code multiplies the augmented slice by the brain mask;
here the background keeps its input values (0 in model space). That matters for FPM, whose
inverse transform spreads intensity over the whole slice. FPM output is clipped to [0, 1]: the
models expect inputs in [0, 1] and masking a spectrum can over- or undershoot.

The paper gives no patch size; ``DDPMConfig.masking_patch`` (8 pixels) sets it.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from .base import random_uniform

__all__ = [
    "STRATEGIES",
    "apply_masking",
    "choose_patches",
    "frequency_patch_filter",
    "patch_grid_shape",
    "patches_to_pixels",
]

STRATEGIES = ("ipm", "fpm", "fpm-cutmix")


def apply_masking(
    slices: torch.Tensor,
    brain_mask: torch.Tensor | None,
    strategy: str,
    *,
    ratio: tuple[float, float] = (0.1, 0.9),
    patch: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked copies of ``slices`` (B, C, H, W) in [0, 1], same shape, for mDDPM training.

    ``brain_mask`` (same shape or (B, 1, H, W), bool) marks the brain; without one the non-zero
    pixels are the brain. Random numbers come from ``generator`` in a fixed order - image
    patches first (IPM, CutMix), then spectrum patches (FPM, CutMix) - so a seeded generator
    gives the same masks, and :func:`choose_patches` with the same seed reproduces them.
    """
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise ValueError(f"masking strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    check_ratio(ratio)
    if patch < 1:
        raise ValueError(f"masking patch must be at least 1 pixel, not {patch}")
    if slices.dim() != 4:
        raise ValueError(f"slices must be (B, C, H, W), not {tuple(slices.shape)}")
    brain = brain_of(slices, brain_mask)

    size = slices.shape[-2:]
    if strategy in ("ipm", "fpm-cutmix"):
        chosen = choose_patches(patch_brain(brain, patch), ratio, generator)
        chosen_pixels = patches_to_pixels(chosen, patch, size) & brain
    if strategy in ("fpm", "fpm-cutmix"):
        # Every spectrum patch may be masked, low or high frequency alike.
        spectrum_patches = torch.ones(
            (slices.shape[0], *patch_grid_shape(size, patch)), dtype=torch.bool, device=slices.device
        )
        kept_frequencies = ~patches_to_pixels(choose_patches(spectrum_patches, ratio, generator), patch, size)
        filtered = frequency_patch_filter(slices, kept_frequencies).clamp(0.0, 1.0)

    if strategy == "ipm":
        return torch.where(chosen_pixels, torch.zeros_like(slices), slices)
    if strategy == "fpm":
        return torch.where(brain, filtered, slices)
    return torch.where(chosen_pixels, filtered, slices)  # fpm-cutmix


def check_ratio(ratio) -> None:
    try:
        low, high = (float(value) for value in ratio)
    except (TypeError, ValueError):
        raise ValueError(f"masking ratio must be (low, high), not {ratio!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"masking ratio must be (low, high) with 0 <= low <= high <= 1, not {ratio!r}")


def brain_of(slices: torch.Tensor, brain_mask: torch.Tensor | None) -> torch.Tensor:
    """The brain as a bool tensor broadcast to ``slices``' shape."""
    if brain_mask is None:
        return slices != 0
    brain = brain_mask.to(device=slices.device, dtype=torch.bool)
    try:
        return brain.expand_as(slices)
    except RuntimeError:
        raise ValueError(f"brain mask {tuple(brain_mask.shape)} does not fit slices {tuple(slices.shape)}") from None


def patch_grid_shape(size, patch: int) -> tuple[int, int]:
    """Rows and columns of the patch grid; a last, partial patch covers any remainder."""
    height, width = size
    return -(-height // patch), -(-width // patch)


def patch_brain(brain: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, rows, cols) bool: patches that contain any brain pixel (in any channel)."""
    any_channel = brain.any(dim=1, keepdim=True).float()
    return functional.max_pool2d(any_channel, patch, stride=patch, ceil_mode=True)[:, 0] > 0


def patches_to_pixels(patches: torch.Tensor, patch: int, size) -> torch.Tensor:
    """(B, rows, cols) per-patch values to a (B, 1, H, W) pixel map."""
    height, width = size
    pixels = patches.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return pixels[:, None, :height, :width]


def choose_patches(
    eligible: torch.Tensor, ratio: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Per slice, a random subset of the ``eligible`` patches (B, rows, cols bool) of size
    round(r · eligible count), with r drawn uniformly in ``ratio`` per slice.

    Vectorised: every patch gets a random score, ineligible ones are pushed to the end, and
    the patches whose rank is below the slice's count are chosen.
    """
    check_ratio(ratio)
    batch = eligible.shape[0]
    flat = eligible.reshape(batch, -1)
    fractions = random_uniform((batch,), generator, eligible.device, low=float(ratio[0]), high=float(ratio[1]))
    scores = random_uniform(flat.shape, generator, eligible.device)
    scores = torch.where(flat, scores, torch.full_like(scores, 2.0))  # ineligible rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    counts = torch.round(fractions * flat.sum(dim=1)).long()
    chosen = (ranks < counts[:, None]) & flat
    return chosen.reshape(eligible.shape)


def frequency_patch_filter(slices: torch.Tensor, kept_frequencies: torch.Tensor) -> torch.Tensor:
    """Real part of the inverse FFT of the centred spectrum multiplied by ``kept_frequencies``
    (broadcastable to ``slices``; True keeps a frequency). Not clipped."""
    # Half precision has no CPU FFT: compute in float32 then, in the input's precision otherwise.
    working = slices if slices.dtype in (torch.float32, torch.float64) else slices.float()
    spectrum = torch.fft.fftshift(torch.fft.fft2(working), dim=(-2, -1))
    spectrum = spectrum * kept_frequencies.to(spectrum.real.dtype)
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return filtered.to(slices.dtype)
