"""Gaussian filtering shared by the scores and the model kinds: one kernel, one filter engine.

SSIM's windows, the smoothing of Mahalanobis maps and PHANES's blurs (``models.phanes``) are all
separable Gaussians with scipy.ndimage's borders; they are computed here once, so the three
agree with scipy and with each other, on the CPU and the GPU alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SSIM_TRUNCATE = 3.5
"""Gaussian window radius in sigmas: int(3.5σ + 0.5), as skimage and the reference code use."""

SMOOTH_TRUNCATE = 4.0
"""Radius (in sigmas) of the Gaussian that smooths maps (MHD maps, PHANES's masks and perceptual
maps): scipy.ndimage.gaussian_filter's default."""

BORDER_MODES = ("reflect", "constant")
"""How a filter sees past the edge: mirrored (scipy.ndimage's 'reflect', d c b a | a b c d) or
zeros (scipy's 'constant' with cval 0)."""

__all__ = ["BORDER_MODES", "SMOOTH_TRUNCATE", "SSIM_TRUNCATE", "gaussian_filter", "gaussian_kernel",
           "mirrored_indices"]


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
in the CPU's cache across the passes, which makes the filter up to twice as fast as one sweep
over the whole stack (five moments of a 96×96×50 volume are 18 MB)."""


def _filter_axis(values: torch.Tensor, kernel: list[float], axis: int, mode: str = "reflect") -> torch.Tensor:
    """Correlate ``values`` with the symmetric ``kernel`` along ``axis``, borders mirrored
    (``mode`` "reflect") or zero (``mode`` "constant").

    The sum of shifted views weighted by the taps is accumulated in place, and the few border
    rows whose neighbours fall outside get the mirrored rows added: no padded copy is made.
    With kernels of at most 13 taps this is several times faster on the CPU than torch's
    convolutions (tuned for many channels and square kernels) and runs unchanged on the GPU.
    With zeros outside, the border rows simply get nothing more.
    """
    radius = (len(kernel) - 1) // 2
    length = values.shape[axis]
    mirrored = mode == "reflect"
    if mirrored and radius > length:  # mirrored more than once (a very thin axis): gather a padded copy
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
        if not mirrored:
            continue
        # Output i < offset reads index i - offset, mirrored to offset - 1 - i; likewise at the end.
        filtered.narrow(axis, 0, offset).add_(values.narrow(axis, 0, offset).flip(axis), alpha=weight)
        filtered.narrow(axis, length - offset, offset).add_(
            values.narrow(axis, length - offset, offset).flip(axis), alpha=weight
        )
    return filtered


def gaussian_filter(
    stack: torch.Tensor, sigma: float, axes: Sequence[int], truncate: float, mode: str = "reflect"
) -> torch.Tensor:
    """Separable Gaussian filter of ``stack`` (C, *spatial) along the given spatial axes.

    One 1D pass per axis (:func:`_filter_axis`), borders as scipy.ndimage's ``mode`` treats them
    (:data:`BORDER_MODES`), radius int(truncate·σ + 0.5). The leading axis is never filtered, so
    on the CPU it is cut into cache-sized chunks. The result is a new tensor of ``stack``'s dtype.
    """
    if mode not in BORDER_MODES:
        raise ValueError(f"mode must be 'reflect' or 'constant', not {mode!r}")
    kernel = gaussian_kernel(sigma, truncate).tolist()
    per_item = max(1, stack[0].numel())
    chunk = stack.shape[0] if stack.is_cuda else max(1, _FILTER_CHUNK_ELEMENTS // per_item)
    filtered_chunks = []
    for part in stack.split(chunk):
        for axis in axes:
            part = _filter_axis(part, kernel, axis + 1, mode)
        filtered_chunks.append(part)
    return filtered_chunks[0] if len(filtered_chunks) == 1 else torch.cat(filtered_chunks)
