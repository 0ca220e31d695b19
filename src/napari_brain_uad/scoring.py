"""Anomaly scores: maps of how unlike its reconstruction(s) each voxel of a scan is.

Step 4 of the data flow, after the reconstructions (``analysis.py`` runs the steps in order).
Every function takes numpy arrays or torch tensors, 2D slices ``(X, Y)`` or 3D volumes
``(X, Y, Z)`` whose axial slices are ``volume[:, :, k]`` (model space), and returns the same
kind as ``image``: a numpy array for a numpy image, a tensor on the image's device for a tensor
(work runs on the GPU when the inputs are there).
Floating inputs keep their precision (float64 stays float64); anything else gives float32.

Scores are "higher = more anomalous" maps, except :func:`ssim_map`, which returns the
similarity itself (1 = identical).

Masks (``mask``, a boolean or 0/1 array of the image's shape, usually the brain mask) never
change the numbers computed inside the mask for the SSIM family; they only set the output
outside it: SSIM 1 there, hence score 0. For the Mahalanobis family the mask also selects the
pixels whose covariance is estimated (see :func:`mahalanobis`). An empty mask is an error.

The registry :data:`SCORERS` lists every scorer with the input it needs (one reconstruction or
N samples) so the widget and the command line need not hard-code them; :func:`score` calls
any of them by name with one convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_TRUNCATE = 3.5
"""Gaussian window radius in sigmas: int(3.5σ + 0.5), as skimage and the reference code use."""

SMOOTH_TRUNCATE = 4.0
"""Radius (in sigmas) of the Gaussian that smooths MHD maps: scipy.ndimage.gaussian_filter's default."""

SSIM_ENS_SIGMAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7)

LESION_DIRECTIONS = ("both", "darker", "brighter")
"""Which deviations a residual counts: both ways, or only the scan darker / brighter than its
reconstruction (lesions go one way in a given contrast: most MS lesions dark on T1, bright on
T2 and FLAIR)."""

__all__ = [
    "SCORERS",
    "SSIM_ENS_SIGMAS",
    "Scorer",
    "ensemble_mean",
    "gaussian_kernel",
    "mirrored_indices",
    "mahalanobis",
    "mhd_ssim",
    "phanes_score",
    "residual",
    "s_mean",
    "score",
    "lesion_direction_scorer",
    "scorer_names",
    "residual_and_segmentation",
    "ssim_and_segmentation",
    "ssim_ens",
    "ssim_map",
]


# --------------------------------------------------------------------------- inputs and outputs


def _device_of(*values) -> torch.device:
    """The device of the first tensor given (the image's if it is one), else the CPU."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _work_dtype(value) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half precision would round
    intensity differences of interest away)."""
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if dtype in (torch.float64, np.float64):
        return torch.float64
    return torch.float32


def _as_tensor(value, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.to(device)
    else:
        array = np.asarray(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
        ):
            raise ValueError(f"{name} must be a numeric array, not one of dtype {array.dtype}")
        if not array.flags.writeable:  # torch.from_numpy warns about read-only memory
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    if tensor.is_complex():
        raise ValueError(f"{name} must be real-valued, not complex")
    if dtype is not None:
        tensor = tensor.to(dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _as_mask(mask, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    tensor = _as_tensor(mask, "mask", device, None)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(tensor.shape)}, the image {tuple(shape)}; they must match")
    if tensor.dtype != torch.bool:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError("mask contains NaN or infinite values")
        tensor = tensor != 0
    if not tensor.any():
        raise ValueError("mask is empty: no voxel is inside it, so there is nothing to score")
    return tensor


def _check_image(image: torch.Tensor) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(
            f"image must be a 2D slice (X, Y) or a 3D volume (X, Y, Z); got {image.ndim} "
            f"dimensions {tuple(image.shape)}"
        )
    if image.numel() == 0:
        raise ValueError(f"image is empty (shape {tuple(image.shape)})")


def _check_same_shape(image: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if tuple(other.shape) != tuple(image.shape):
        raise ValueError(f"{name} has shape {tuple(other.shape)}, the image {tuple(image.shape)}; they must match")


def _check_samples(image: torch.Tensor, samples: torch.Tensor) -> None:
    if samples.ndim != image.ndim + 1 or tuple(samples.shape[1:]) != tuple(image.shape):
        raise ValueError(
            f"samples must have shape (N, *image.shape) = (N, {', '.join(map(str, image.shape))}); "
            f"got {tuple(samples.shape)}"
        )
    if samples.shape[0] < 2:
        raise ValueError(f"at least 2 samples are needed to estimate a covariance; got N = {samples.shape[0]}")


def _output(result: torch.Tensor, like) -> ArrayLike:
    """Return ``result`` as the same kind as ``like``, with its precision."""
    if isinstance(like, torch.Tensor):
        return result.to(like.dtype if like.is_floating_point() else torch.float32)
    array = result.detach().cpu().numpy()
    like_dtype = np.asarray(like).dtype if not isinstance(like, np.ndarray) else like.dtype
    if like_dtype == np.float64:
        return array.astype(np.float64, copy=False)
    return array.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- Gaussian filtering


def gaussian_kernel(
    sigma: float, truncate: float = SSIM_TRUNCATE, *, dtype=torch.float64, device=None
) -> torch.Tensor:
    """1D Gaussian of spread ``sigma`` with radius int(truncate·σ + 0.5), normalised to sum 1.

    With the default truncate of 3.5 the size is int(3.5σ + 0.5)·2 + 1, the SSIM window.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def mirrored_indices(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding an axis by ``radius`` mirrored about the edge (d c b a | a b c d | d c b a),
    scipy.ndimage's 'reflect' mode, so border values match skimage and scipy too. The modulo
    makes it valid when the radius exceeds the axis length (thin volumes)."""
    indices = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(indices >= length, 2 * length - 1 - indices, indices)


_FILTER_CHUNK_ELEMENTS = 1 << 19
"""Elements filtered at a time: half a million float64 values (4 MB) and their temporaries stay
in the CPU's cache across the passes, which makes the filter about twice as fast as one sweep
over the whole stack (five moments of a 96×96×50 volume are 18 MB)."""


def _filter_axis(values: torch.Tensor, kernel: list[float], axis: int) -> torch.Tensor:
    """Correlate ``values`` with the symmetric ``kernel`` along ``axis``, borders mirrored.

    The sum of shifted views weighted by the taps is accumulated in place, and the few border
    rows whose neighbours fall outside get the mirrored rows added: no padded copy is made.
    With kernels of at most 13 taps this is several times faster on the CPU than torch's
    convolutions (tuned for many channels and square kernels) and runs unchanged on the GPU.
    """
    radius = (len(kernel) - 1) // 2
    length = values.shape[axis]
    if radius > length:  # mirrored more than once (a very thin axis): gather a padded copy
        padded = values.index_select(axis, mirrored_indices(length, radius, values.device))
        filtered = padded.narrow(axis, radius, length) * kernel[radius]
        for offset in range(1, radius + 1):
            filtered.add_(padded.narrow(axis, radius - offset, length), alpha=kernel[radius + offset])
            filtered.add_(padded.narrow(axis, radius + offset, length), alpha=kernel[radius + offset])
        return filtered
    filtered = values * kernel[radius]
    for offset in range(1, radius + 1):
        weight = kernel[radius + offset]
        inner = length - offset
        if inner > 0:
            filtered.narrow(axis, offset, inner).add_(values.narrow(axis, 0, inner), alpha=weight)
            filtered.narrow(axis, 0, inner).add_(values.narrow(axis, offset, inner), alpha=weight)
        # Output i < offset reads index i - offset, mirrored to offset - 1 - i; likewise at the end.
        filtered.narrow(axis, 0, offset).add_(values.narrow(axis, 0, offset).flip(axis), alpha=weight)
        filtered.narrow(axis, length - offset, offset).add_(
            values.narrow(axis, length - offset, offset).flip(axis), alpha=weight
        )
    return filtered


_FILTER_CHUNK_ELEMENTS = 1 << 19
"""Elements filtered at a time: half a million float64 values (4 MB) and their temporaries stay
in the CPU's cache across the passes, which makes the filter up to twice as fast as one sweep
over the whole stack (five moments of a 96×96×50 volume are 18 MB)."""


def _gaussian_filter(stack: torch.Tensor, sigma: float, axes: Sequence[int], truncate: float) -> torch.Tensor:
    """Separable Gaussian filter of ``stack`` (C, *spatial) along the given spatial axes.

    One 1D pass per axis (:func:`_filter_axis`), borders mirrored as scipy.ndimage's 'reflect'
    mode does. The leading axis is never filtered, so on the CPU it is cut into cache-sized
    chunks.
    """
    kernel = gaussian_kernel(sigma, truncate).tolist()
    per_item = max(1, stack[0].numel())
    chunk = stack.shape[0] if stack.is_cuda else max(1, _FILTER_CHUNK_ELEMENTS // per_item)
    filtered_chunks = []
    for part in stack.split(chunk):
        for axis in axes:
            part = _filter_axis(part, kernel, axis + 1)
        filtered_chunks.append(part)
    return filtered_chunks[0] if len(filtered_chunks) == 1 else torch.cat(filtered_chunks)


# --------------------------------------------------------------------------- residual and SSIM


def residual(
    image: ArrayLike, reconstruction: ArrayLike, mask: ArrayLike | None = None, direction: str = "both"
) -> ArrayLike:
    """|x − x̂| per voxel; 0 outside ``mask`` when one is given.

    ``direction`` counts only deviations one way: ``"darker"`` keeps x̂ − x where the scan is
    darker than its reconstruction (most MS lesions on T1), ``"brighter"`` x − x̂ where it is
    brighter (lesions on T2 and FLAIR); the other voxels score 0."""
    if direction not in LESION_DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(LESION_DIRECTIONS)}, not {direction!r}")
    device = _device_of(image, reconstruction)
    x = _as_tensor(image, "image", device, _work_dtype(image))
    _check_image(x)
    y = _as_tensor(reconstruction, "reconstruction", device, x.dtype)
    _check_same_shape(x, y, "reconstruction")
    inside = _as_mask(mask, x.shape, device)
    difference = x - y
    if direction == "both":
        result = difference.abs()
    else:
        result = (difference if direction == "brighter" else -difference).clamp(min=0)
    if inside is not None:
        result = torch.where(inside, result, torch.zeros_like(result))
    return _output(result, image)


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
        mu_x, mu_y, mean_xx, mean_yy, mean_xy = _gaussian_filter(moments, sigma, axes, SSIM_TRUNCATE)
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
    device = _device_of(image, reference)
    # float64 whatever the input: in float32 the variances E[x²] − E[x]² lose enough digits to
    # move SSIM by up to 4e-3 at small sigma (skimage's own float32 result is that far off).
    x = _as_tensor(image, "image", device, torch.float64)
    _check_image(x)
    y = _as_tensor(reference, "reference", device, x.dtype)
    _check_same_shape(x, y, "reference")
    return x, y, _as_mask(mask, x.shape, device)


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
    return _output(result, image)


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
    return _output(result, image)


# --------------------------------------------------------------------------- Mahalanobis distance


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
    device = _device_of(image, samples)
    x = _as_tensor(image, "image", device, torch.float64)
    _check_image(x)
    stack = _as_tensor(samples, "samples", device, None)
    _check_samples(x, stack)
    if not torch.isfinite(stack).all():
        raise ValueError("samples contains NaN or infinite values")
    inside = _as_mask(mask, x.shape, device)
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
        scores = _gaussian_filter(scores, float(smooth_sigma), (0, 1), SMOOTH_TRUNCATE)
        scores = scores * weight.reshape(n_slices, height, width)
    result = scores.permute(1, 2, 0)
    if not volume:
        result = result[..., 0]
    return _output(result.contiguous(), image)


# --------------------------------------------------------------------------- combinations


def _samples_mean(image, samples) -> tuple[torch.Tensor, torch.device]:
    device = _device_of(image, samples)
    x = _as_tensor(image, "image", device, torch.float64)
    _check_image(x)
    stack = _as_tensor(samples, "samples", device, x.dtype)
    _check_samples(x, stack)
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
    distance = _as_tensor(distance, "mahalanobis", device, mean.dtype)
    inside = _as_mask(mask, distance.shape, device)
    peak = distance[inside].max() if inside is not None else distance.max()
    if peak > 0:
        distance = distance / peak
    similarity = _as_tensor(
        ssim_map(image, mean, sigma=sigma, data_range=data_range, mask=mask), "ssim", device, mean.dtype
    )
    return _output(distance * (1 - similarity), image)


def ensemble_mean(reconstructions: ArrayLike | Sequence[ArrayLike]) -> ArrayLike:
    """Average of reconstructions made at an ensemble of noise levels.

    ``reconstructions`` is an array or tensor (M, *shape) or a sequence of M arrays or tensors
    of one shape; the result has that shape and the kind of the first member.
    """
    if isinstance(reconstructions, (np.ndarray, torch.Tensor)):
        # Already stacked: average along the first axis without splitting it up.
        device = _device_of(reconstructions)
        stacked = _as_tensor(reconstructions, "reconstructions", device, _work_dtype(reconstructions))
        if stacked.ndim < 2 or stacked.shape[0] == 0:
            raise ValueError(
                f"ensemble_mean needs at least one reconstruction stacked along axis 0; got shape {tuple(stacked.shape)}"
            )
        return _output(stacked.mean(dim=0), reconstructions)
    members = list(reconstructions)
    if not members:
        raise ValueError("ensemble_mean needs at least one reconstruction")
    device = _device_of(*members)
    first = members[0]
    dtype = _work_dtype(first)
    tensors = [_as_tensor(member, f"reconstruction {i}", device, dtype) for i, member in enumerate(members)]
    shape = tuple(tensors[0].shape)
    for i, tensor in enumerate(tensors):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"reconstruction {i} has shape {tuple(tensor.shape)}, the first {shape}; they must match")
    return _output(torch.stack(tensors).mean(dim=0), first)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Scorer:
    """One anomaly score: ``fn(image, other, mask=None, **params)``, higher = more anomalous.

    ``needs`` says what ``other`` is: ``"reconstruction"`` (one image of the image's shape) or
    ``"samples"`` (N ≥ 2 reconstructions stacked along a new first axis). ``params`` names the
    keyword arguments ``fn`` accepts, with their defaults. ``needs_maps`` names the maps a model
    kind computes beside its reconstruction (``ReconstructionModel.extra_maps``) that ``fn``
    takes as ``maps={name: array}``; only kinds that make them can use the scorer.

    How the score is post-processed (``postprocess.prepare``) is the paper's rule for it, so it
    is declared here: ``median_filtered`` (the 5³ median, the default of ``AnalysisSettings``),
    ``brain_eroded`` (the brain's rim cut away) and ``after_median`` — ``after_median(maps,
    **params)`` gives the part of the score that is added after the median, untouched by it
    (SADM's segmentation term), or None.
    """

    name: str
    fn: Callable[..., ArrayLike]
    needs: Literal["reconstruction", "samples"]
    description: str
    params: Mapping[str, object] = field(default_factory=dict)
    needs_maps: tuple[str, ...] = ()
    median_filtered: bool = True
    brain_eroded: bool = True
    after_median: Callable[..., np.ndarray] | None = None

    @property
    def needs_samples(self) -> bool:
        return self.needs == "samples"

    @property
    def default_samples(self) -> int:
        """Reconstructions to make when the user does not say: the thesis's N for scorers that
        compare several, else one."""
        return SAMPLES_FOR_DISTRIBUTION if self.needs_samples else 1

    def part_after_median(self, maps: Mapping[str, ArrayLike] | None, mask=None, **params) -> np.ndarray | None:
        """The part of this scorer's map that post-processing adds after the median filter
        (0 outside ``mask``), or None when the median sees the whole map."""
        if self.after_median is None:
            return None
        part = np.asarray(self.after_median(maps or {}, **{**self.params, **params}), dtype=np.float32)
        return part if mask is None else np.where(np.asarray(mask, dtype=bool), part, np.float32(0))

    def usable_with(self, maps: Sequence[str]) -> bool:
        """Whether a model that makes the maps ``maps`` can feed this scorer."""
        return set(self.needs_maps) <= set(maps)

    def __call__(self, image: ArrayLike, other: ArrayLike, mask: ArrayLike | None = None,
                 maps: Mapping[str, ArrayLike] | None = None, **params) -> ArrayLike:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"scorer {self.name!r} does not take {', '.join(unknown)}; "
                f"it takes {', '.join(self.params) or 'no parameters'}"
            )
        if not self.needs_maps:
            return self.fn(image, other, mask=mask, **params)
        missing = [name for name in self.needs_maps if name not in (maps or {})]
        if missing:
            raise ValueError(f"scorer {self.name!r} needs the model's {', '.join(missing)} map(s)")
        return self.fn(image, other, mask=mask, maps={name: maps[name] for name in self.needs_maps}, **params)


def _ssim_score(image, reconstruction, mask=None, sigma=1.0, data_range=None):
    return 1 - ssim_map(image, reconstruction, sigma=sigma, data_range=data_range, mask=mask)


def _mhd_scorer(covariance: str) -> Callable[..., ArrayLike]:
    def fn(image, samples, mask=None, reg=1e-2, smooth_sigma=1.0):
        return mahalanobis(image, samples, mask=mask, covariance=covariance, reg=reg, smooth_sigma=smooth_sigma)

    return fn


def _mhd_ssim_scorer(covariance: str) -> Callable[..., ArrayLike]:
    def fn(image, samples, mask=None, reg=1e-2, smooth_sigma=1.0, sigma=1.0, data_range=None):
        return mhd_ssim(
            image, samples, mask=mask, covariance=covariance, reg=reg, smooth_sigma=smooth_sigma,
            sigma=sigma, data_range=data_range,
        )

    return fn


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
    dissimilarity = 1 - _as_tensor(ssim_map(image, reconstruction, sigma=sigma, data_range=data_range, mask=mask),
                                   "ssim", _device_of(image, reconstruction), _work_dtype(image))
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
    error = _as_tensor(residual(image, reconstruction), "residual", _device_of(image, reconstruction),
                       _work_dtype(image))
    return _plus_segmentation(error, image, mask, maps, weight)


def _plus_segmentation(unsupervised: torch.Tensor, image, mask, maps, weight) -> ArrayLike:
    """unsupervised + ŷ, or β·unsupervised + (1 − β)·ŷ; 0 outside ``mask``."""
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be between 0 and 1, not {weight}")
    device = unsupervised.device
    segmentation = _as_tensor(maps["segmentation"], "segmentation", device, unsupervised.dtype)
    if segmentation.shape != unsupervised.shape:
        raise ValueError(f"segmentation has shape {tuple(segmentation.shape)}, the image {tuple(unsupervised.shape)}")
    combined = (unsupervised + segmentation if weight is None
                else weight * unsupervised + (1 - weight) * segmentation)
    region = _as_mask(mask, tuple(combined.shape), device)
    if region is not None:
        combined = torch.where(region, combined, torch.zeros((), dtype=combined.dtype, device=device))
    return _output(combined, image)


def segmentation_term(maps: Mapping[str, ArrayLike], weight: float | None = None, **_) -> np.ndarray:
    """SADM's segmentation term of its score: ŷ, or (1 − β)·ŷ for the weighted form. The
    paper median-filters the unsupervised map only and adds this term after post-processing, so
    a predicted region one or two slices thick survives."""
    values = maps["segmentation"]
    segmentation = (values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values))
    segmentation = segmentation.astype(np.float32, copy=False)
    return segmentation if weight is None else np.float32(1 - weight) * segmentation


def phanes_score(
    image: ArrayLike,
    reconstruction: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    maps: Mapping[str, ArrayLike],
) -> ArrayLike:
    """PHANES's anomaly map: |x − x_ph| · S_perc(x_ph, x), the residual to the pseudo-healthy
    reconstruction times the model's perceptual difference map ("perceptual"). 0 outside ``mask``."""
    device = _device_of(image, reconstruction)
    difference = _as_tensor(residual(image, reconstruction), "residual", device, _work_dtype(image))
    perceptual = _as_tensor(maps["perceptual"], "perceptual", device, difference.dtype)
    if perceptual.shape != difference.shape:
        raise ValueError(f"perceptual has shape {tuple(perceptual.shape)}, the image {tuple(difference.shape)}")
    combined = difference * perceptual
    region = _as_mask(mask, tuple(combined.shape), device)
    if region is not None:
        combined = torch.where(region, combined, torch.zeros((), dtype=combined.dtype, device=device))
    return _output(combined, image)


def _directed_residual(direction: str) -> Callable[..., ArrayLike]:
    def fn(image, reconstruction, mask=None):
        return residual(image, reconstruction, mask=mask, direction=direction)

    return fn


# N reconstructions with fresh noise for the scorers that compare the scan with their spread
# (the thesis uses 10 for MHD).
SAMPLES_FOR_DISTRIBUTION = 10
_MHD_PARAMS = {"reg": 1e-2, "smooth_sigma": 1.0}
_SSIM_PARAMS = {"sigma": 1.0, "data_range": None}

SCORERS: Mapping[str, Scorer] = MappingProxyType(
    {
        scorer.name: scorer
        for scorer in (
            Scorer("residual", residual, "reconstruction", "|x − x̂|: absolute reconstruction error"),
            Scorer("residual-dark", _directed_residual("darker"), "reconstruction",
                   "x̂ − x where the scan is darker than its reconstruction, else 0 (lesions dark on T1)"),
            Scorer("residual-bright", _directed_residual("brighter"), "reconstruction",
                   "x − x̂ where the scan is brighter than its reconstruction, else 0 (lesions bright on T2/FLAIR)"),
            Scorer("ssim", _ssim_score, "reconstruction", "1 − SSIM(x, x̂), Gaussian window σ", _SSIM_PARAMS),
            Scorer(
                "ssim-ens", ssim_ens, "reconstruction",
                "1 − softmax(−SSIM)-weighted SSIM over window spreads σ = 0.3 … 1.7",
                {"sigmas": SSIM_ENS_SIGMAS, "data_range": None},
            ),
            Scorer(
                "mhd-diag", _mhd_scorer("diag"), "samples",
                "Mahalanobis distance to N reconstructions, per-pixel variances only", _MHD_PARAMS,
            ),
            Scorer(
                "mhd-full", _mhd_scorer("full"), "samples",
                "Mahalanobis distance to N reconstructions, full covariance per slice", _MHD_PARAMS,
            ),
            Scorer(
                "mhd-full-ssim", _mhd_ssim_scorer("full"), "samples",
                "normalised full-covariance MHD × (1 − SSIM(x, mean of the samples))",
                {**_MHD_PARAMS, **_SSIM_PARAMS},
            ),
            Scorer(
                "mhd-diag-ssim", _mhd_ssim_scorer("diag"), "samples",
                "normalised diagonal MHD × (1 − SSIM(x, mean of the samples))",
                {**_MHD_PARAMS, **_SSIM_PARAMS},
            ),
            Scorer("s-mean", s_mean, "samples", "1 − SSIM(x, mean of the N samples)", _SSIM_PARAMS),
            Scorer(
                "ssim+segmentation", ssim_and_segmentation, "reconstruction",
                "SADM: (1 − SSIM(x, x̂)) + the segmentation network's output, or β-weighted",
                {**_SSIM_PARAMS, "weight": None}, needs_maps=("segmentation",), after_median=segmentation_term,
            ),
            Scorer(
                "residual+segmentation", residual_and_segmentation, "reconstruction",
                "SADM with the residual: |x − x̂| + the segmentation network's output, or β-weighted",
                {"weight": None}, needs_maps=("segmentation",), after_median=segmentation_term,
            ),
            Scorer(
                "phanes", phanes_score, "reconstruction",
                "PHANES: |x − x̂| × the model's perceptual difference map S_perc(x̂, x)",
                # The paper's map as it is: it is exactly 0 outside the inpainted region, which
                # a 5³ median would erase where it is 4 mm thick or less.
                {}, needs_maps=("perceptual",), median_filtered=False, brain_eroded=False,
            ),
        )
    }
)
"""Every scorer by name, in a fixed order (read-only)."""


# Which way lesions go in each contrast (most MS lesions: dark on T1, bright on T2 and FLAIR),
# and the one-way residual that counts only that way. Contrasts not listed (T1c: enhancing
# lesions are bright, necrosis dark) have none: both ways count.
LESION_DIRECTION_OF_MODALITY = {"T1": "darker", "T2": "brighter", "FLAIR": "brighter"}
_DIRECTED_RESIDUAL = {"darker": "residual-dark", "brighter": "residual-bright"}


def lesion_direction_scorer(modality: str | None) -> str | None:
    """The residual that counts only the lesion direction of ``modality`` (a model's contrast),
    or None when the contrast has no single lesion direction."""
    direction = LESION_DIRECTION_OF_MODALITY.get(str(modality or "").upper())
    return _DIRECTED_RESIDUAL.get(direction) if direction else None


def scorer_names(needs: str | None = None, maps: Sequence[str] | None = None) -> list[str]:
    """Names in :data:`SCORERS`, optionally only those needing ``"reconstruction"`` or ``"samples"``,
    and only those a model making the extra maps ``maps`` can feed (None: no filter)."""
    return [name for name, scorer in SCORERS.items()
            if (needs is None or scorer.needs == needs) and (maps is None or scorer.usable_with(maps))]


def score(
    name: str,
    image: ArrayLike,
    reconstruction_or_samples: ArrayLike,
    mask: ArrayLike | None = None,
    maps: Mapping[str, ArrayLike] | None = None,
    **params,
) -> ArrayLike:
    """Compute the scorer ``name`` of :data:`SCORERS`: one call convention for all of them
    (``maps``: the model's extra maps, for the scorers that need them)."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}") from None
    return scorer(image, reconstruction_or_samples, mask=mask, maps=maps, **params)
