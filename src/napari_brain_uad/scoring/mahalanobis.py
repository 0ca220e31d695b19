"""Scores against N reconstructions with fresh noise: the Mahalanobis distance to their spread,
its product with SSIM, and S_mean (1 − SSIM to their mean).

Conventions (inputs, outputs, masks) as every score's: see ``scoring.arrays``; here the mask
also selects the pixels whose covariance is estimated (see :func:`mahalanobis`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .arrays import ArrayLike, as_mask, as_tensor, check_image, check_samples, device_of, output_like
from .filters import SMOOTH_TRUNCATE, gaussian_filter
from .ssim import ssim_map

__all__ = ["mahalanobis", "mhd_ssim", "s_mean"]


def mahalanobis(
    image: ArrayLike,
    samples: ArrayLike,
    mask: ArrayLike | None = None,
    covariance: Literal["full", "diag"] = "full",
    reg: float = 1e-2,
    smooth_sigma: float = 1.0,
) -> ArrayLike:
    """Per-pixel Mahalanobis distance of ``image`` to N reconstructions ``samples`` (N, *image.shape).

    Slice by slice for a volume (axial slices ``[:, :, k]``), over the pixels inside ``mask``
    (the whole slice without one): d = x − mean of the samples, Σ = sample covariance of the
    samples (divided by N − 1) + reg·I, and score_p = sqrt(max(0, d_p·[Σ⁻¹d]_p)), so the
    squared scores sum to the squared distance dᵀΣ⁻¹d of the slice.

    ``covariance="full"`` uses the whole P×P covariance, exactly: it is U·Uᵀ + reg·I with
    U = centred samples / √(N − 1) of rank ≤ N − 1, so by the Woodbury identity
    Σ⁻¹d = (d − U (reg·I_N + UᵀU)⁻¹ Uᵀd) / reg needs one N×N solve per slice instead of a
    P×P inverse; all slices are solved in one batch. ``covariance="diag"`` keeps only the
    per-pixel variances: Σ⁻¹d = d / (variance + reg).

    The covariance is computed in float64 whatever the input precision, because the division
    by a small ``reg`` magnifies rounding errors in the difference d − U(…).

    The map is 0 outside the mask and on slices with fewer than 2 pixels in it. It is then
    smoothed in-plane per slice by a Gaussian of spread ``smooth_sigma`` (radius
    int(4σ + 0.5), mirrored borders: scipy.ndimage.gaussian_filter's defaults) applied to the
    whole slice, and set to 0 outside the mask again; ``smooth_sigma=0`` disables smoothing.
    """
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', not {covariance!r}")
    if not (float(reg) > 0 and math.isfinite(float(reg))):
        raise ValueError(f"reg must be a positive number, not {reg}")
    if not (float(smooth_sigma) >= 0 and math.isfinite(float(smooth_sigma))):
        raise ValueError(f"smooth_sigma must be 0 (no smoothing) or positive, not {smooth_sigma}")
    reg = float(reg)
    device = device_of(image, samples)
    x = as_tensor(image, "image", device, torch.float64)
    check_image(x)
    stack = as_tensor(samples, "samples", device, None)
    check_samples(x, stack)
    if not torch.isfinite(stack).all():
        raise ValueError("samples contains NaN or infinite values")
    inside = as_mask(mask, x.shape, device)
    if inside is None:
        inside = torch.ones(x.shape, dtype=torch.bool, device=device)

    volume = x.ndim == 3
    if not volume:  # a slice is a volume of one slice
        x, stack, inside = x[..., None], stack[..., None], inside[..., None]
    n_samples = stack.shape[0]
    height, width, n_slices = x.shape
    pixels = height * width
    # Slice-major, pixels flattened: (Z, P) and (Z, N, P).
    x_flat = x.permute(2, 0, 1).reshape(n_slices, pixels)
    # One pass reorders and widens the samples into a buffer of our own, which the centring
    # below then overwrites in place: the samples are the largest array here (N × volume).
    samples_flat = torch.empty((n_slices, n_samples, pixels), dtype=torch.float64, device=device)
    samples_flat.view(n_slices, n_samples, height, width).copy_(stack.permute(3, 0, 1, 2))
    weight = inside.permute(2, 0, 1).reshape(n_slices, pixels).to(torch.float64)

    mean = samples_flat.mean(dim=1)
    # Zeroing the pixels outside the mask removes their rows from U and d: the products below
    # then equal those over the brain pixels alone, with no ragged per-slice gathering.
    d = (x_flat - mean) * weight
    u_t = samples_flat.sub_(mean[:, None, :]).mul_((weight / math.sqrt(n_samples - 1))[:, None, :])  # Uᵀ: (Z, N, P)
    if covariance == "full":
        gram = u_t @ u_t.transpose(1, 2)  # UᵀU: (Z, N, N)
        gram = gram + reg * torch.eye(n_samples, dtype=gram.dtype, device=device)
        coefficients = torch.linalg.solve(gram, u_t @ d[..., None])  # (reg·I + UᵀU)⁻¹ Uᵀd
        inverse_times_d = (d - (u_t.transpose(1, 2) @ coefficients).squeeze(-1)) / reg
    else:
        variance = (u_t * u_t).sum(dim=1)
        inverse_times_d = d / (variance + reg)
    scores = torch.sqrt(torch.clamp(d * inverse_times_d, min=0))
    enough = weight.sum(dim=1, keepdim=True) >= 2
    scores = torch.where(enough & (weight > 0), scores, torch.zeros_like(scores))
    scores = scores.reshape(n_slices, height, width)
    if smooth_sigma > 0:
        scores = gaussian_filter(scores, float(smooth_sigma), (0, 1), SMOOTH_TRUNCATE)
        scores = scores * weight.reshape(n_slices, height, width)
    result = scores.permute(1, 2, 0)
    if not volume:
        result = result[..., 0]
    return output_like(result.contiguous(), image)


# --------------------------------------------------------------------------- combinations


def _samples_mean(image, samples) -> tuple[torch.Tensor, torch.device]:
    device = device_of(image, samples)
    x = as_tensor(image, "image", device, torch.float64)
    check_image(x)
    stack = as_tensor(samples, "samples", device, x.dtype)
    check_samples(x, stack)
    return stack.mean(dim=0), device


def s_mean(
    image: ArrayLike,
    samples: ArrayLike,
    mask: ArrayLike | None = None,
    sigma: float = 1.0,
    data_range: float | None = None,
) -> ArrayLike:
    """S_mean = 1 − SSIM(x, mean of the N samples), 0 outside ``mask`` (see :func:`ssim_map`)."""
    mean, _ = _samples_mean(image, samples)
    similarity = ssim_map(image, mean, sigma=sigma, data_range=data_range, mask=mask)
    return 1 - similarity


def mhd_ssim(
    image: ArrayLike,
    samples: ArrayLike,
    mask: ArrayLike | None = None,
    covariance: Literal["full", "diag"] = "full",
    reg: float = 1e-2,
    smooth_sigma: float = 1.0,
    sigma: float = 1.0,
    data_range: float | None = None,
) -> ArrayLike:
    """Normalised MHD ⊙ (1 − SSIM(x, mean of the samples)).

    The :func:`mahalanobis` map (``covariance``, ``reg``, ``smooth_sigma``) is divided by its
    maximum inside ``mask`` (the whole image without one; a map that is 0 everywhere stays 0),
    so it lies in [0, 1] and the product keeps SSIM's scale. SSIM uses window spread ``sigma``
    and ``data_range`` as :func:`ssim_map`, in 3D for volumes. 0 outside the mask.
    """
    mean, device = _samples_mean(image, samples)
    distance = mahalanobis(image, samples, mask=mask, covariance=covariance, reg=reg, smooth_sigma=smooth_sigma)
    distance = as_tensor(distance, "mahalanobis", device, mean.dtype)
    inside = as_mask(mask, distance.shape, device)
    peak = distance[inside].max() if inside is not None else distance.max()
    if peak > 0:
        distance = distance / peak
    similarity = as_tensor(
        ssim_map(image, mean, sigma=sigma, data_range=data_range, mask=mask), "ssim", device, mean.dtype
    )
    return output_like(distance * (1 - similarity), image)

