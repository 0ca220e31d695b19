"""Structural similarity: the SSIM map of a scan and its reconstruction, and SSIM-ens.

Conventions (inputs, outputs, masks) as every score's: see ``scoring.arrays``. :func:`ssim_map`
returns the similarity itself (1 = identical); the scores are 1 − SSIM and :func:`ssim_ens`.
A mask never changes the numbers inside it; it sets SSIM 1 (score 0) outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .arrays import ArrayLike, as_mask, as_tensor, check_image, check_same_shape, device_of, output_like
from .filters import SSIM_TRUNCATE, gaussian_filter

SSIM_K1 = 0.01
SSIM_K2 = 0.03

SSIM_ENS_SIGMAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7)

__all__ = ["SSIM_ENS_SIGMAS", "SSIM_K1", "SSIM_K2", "ssim_ens", "ssim_map"]


def _resolve_data_range(x: torch.Tensor, data_range: float | None) -> float:
    if data_range is None:
        value = float(x.detach().max() - x.detach().min())
        # A constant image (e.g. an all-background slice) has no range; model-space intensities
        # span [0, 1], so 1 is the range that keeps the constants C1, C2 meaningful.
        return value if value > 0 else 1.0
    value = float(data_range)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"data_range must be a positive number, not {data_range}")
    return value


def _ssim_tensors(
    x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float], data_range: float
) -> torch.Tensor:
    """SSIM maps (len(sigmas), *x.shape) in 2D or 3D as x is, with population statistics."""
    axes = tuple(range(x.ndim))
    # The five local moments are filtered together: one convolution call per axis and sigma.
    moments = torch.stack([x, y, x * x, y * y, x * y])
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    maps = []
    for sigma in sigmas:
        mu_x, mu_y, mean_xx, mean_yy, mean_xy = gaussian_filter(moments, sigma, axes, SSIM_TRUNCATE)
        if moments.requires_grad:  # the in-place form below would break autograd's saved values
            numerator = (2 * mu_x * mu_y + c1) * (2 * (mean_xy - mu_x * mu_y) + c2)
            denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (mean_xx + mean_yy - mu_x * mu_x - mu_y * mu_y + c2)
            maps.append(numerator / denominator)
            continue
        # SSIM = (2 μx μy + C1)(2 cov + C2) / ((μx² + μy² + C1)(var_x + var_y + C2)), written
        # with in-place operations on the freshly filtered moments to spare temporaries.
        mu_xy = mu_x * mu_y
        mean_squares = mu_x.square_().add_(mu_y.square_())  # μx² + μy²
        variances = mean_xx.add_(mean_yy).sub_(mean_squares).add_(c2)  # var_x + var_y + C2
        covariance = mean_xy.sub_(mu_xy).mul_(2).add_(c2)  # 2 cov + C2
        numerator = mu_xy.mul_(2).add_(c1).mul_(covariance)
        maps.append(numerator.div_(mean_squares.add_(c1).mul_(variances)))
    return torch.stack(maps)


def _prepare_pair(image, reference, mask):
    device = device_of(image, reference)
    # float64 whatever the input: in float32 the variances E[x²] − E[x]² lose enough digits to
    # move SSIM by up to 4e-3 at small sigma (skimage's own float32 result is that far off).
    x = as_tensor(image, "image", device, torch.float64)
    check_image(x)
    y = as_tensor(reference, "reference", device, x.dtype)
    check_same_shape(x, y, "reference")
    return x, y, as_mask(mask, x.shape, device)


def _check_sigmas(sigmas) -> tuple[float, ...]:
    values = tuple(float(s) for s in sigmas)
    if not values:
        raise ValueError("sigmas must name at least one Gaussian spread")
    for value in values:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"every sigma must be a positive number; got {value}")
    return values


def ssim_map(
    image: ArrayLike,
    reference: ArrayLike,
    sigma: float = 1.0,
    data_range: float | None = None,
    mask: ArrayLike | None = None,
) -> ArrayLike:
    """Per-voxel structural similarity of ``image`` and ``reference`` (1 = identical).

    Gaussian window of spread ``sigma`` truncated to int(3.5σ + 0.5)·2 + 1 taps and normalised,
    population (co)variances, K1 = 0.01, K2 = 0.03, C1 = (K1·R)², C2 = (K2·R)². Computed in 3D
    (a 3D window) for a volume, as the reference code does, and in 2D for a slice. Borders are
    mirrored (scipy's 'reflect'), so the map equals skimage's
    ``structural_similarity(..., gaussian_weights=True, sigma=σ, use_sample_covariance=False,
    data_range=R, full=True)[1]`` everywhere, the border included.

    ``data_range`` R defaults to max − min of ``image`` (not of the reference); for a constant
    image, whose range is 0, R = 1 (model-space intensities lie in [0, 1]).
    ``mask``: the map is computed on the whole image (windows near the mask edge see the voxels
    outside it), then set to 1 outside the mask, so 1 − SSIM scores 0 there.
    """
    x, y, inside = _prepare_pair(image, reference, mask)
    sigma = _check_sigmas([sigma])[0]
    result = _ssim_tensors(x, y, [sigma], _resolve_data_range(x, data_range))[0]
    if inside is not None:
        result = torch.where(inside, result, torch.ones_like(result))
    return output_like(result, image)


def ssim_ens(
    image: ArrayLike,
    reference: ArrayLike,
    sigmas: Sequence[float] = SSIM_ENS_SIGMAS,
    data_range: float | None = None,
    mask: ArrayLike | None = None,
) -> ArrayLike:
    """Ensembled-SSIM anomaly score: 1 − Σ_i w_i·SSIM_i over the window spreads ``sigmas``.

    Per voxel the weights are w = softmax(−SSIM_1, …, −SSIM_K), so the spreads that see the
    voxel as most dissimilar weigh most. Each SSIM_i is :func:`ssim_map` with spread σ_i
    (``data_range`` as there). The score is 0 outside ``mask``.
    """
    x, y, inside = _prepare_pair(image, reference, mask)
    sigmas = _check_sigmas(sigmas)
    maps = _ssim_tensors(x, y, sigmas, _resolve_data_range(x, data_range))
    weights = torch.softmax(-maps, dim=0)
    result = 1 - (weights * maps).sum(dim=0)
    if inside is not None:
        result = torch.where(inside, result, torch.zeros_like(result))
    return output_like(result, image)

