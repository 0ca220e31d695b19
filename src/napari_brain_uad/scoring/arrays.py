"""Inputs and outputs of every score: numpy arrays or torch tensors in, the image's kind out.

A score takes numpy arrays or torch tensors, 2D slices ``(X, Y)`` or 3D volumes ``(X, Y, Z)``
whose axial slices are ``volume[:, :, k]`` (model space), and returns the same kind as
``image``: a numpy array for a numpy image, a tensor on the image's device for a tensor (work
runs on the GPU when the inputs are there). Floating inputs keep their precision (float64
stays float64); anything else gives float32. The helpers here do that coercion and the shape
checks once, for the scores in this package and for the scores a model kind contributes
(``models.sadm``, ``models.phanes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "ArrayLike",
    "as_mask",
    "as_tensor",
    "check_image",
    "check_same_shape",
    "check_samples",
    "device_of",
    "ensemble_mean",
    "output_like",
    "work_dtype",
]


def device_of(*values) -> torch.device:
    """The device of the first tensor given (the image's if it is one), else the CPU."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def work_dtype(value) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half precision would round
    intensity differences of interest away)."""
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if dtype in (torch.float64, np.float64):
        return torch.float64
    return torch.float32


def as_tensor(value, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
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


def as_mask(mask, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    tensor = as_tensor(mask, "mask", device, None)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(tensor.shape)}, the image {tuple(shape)}; they must match")
    if tensor.dtype != torch.bool:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError("mask contains NaN or infinite values")
        tensor = tensor != 0
    if not tensor.any():
        raise ValueError("mask is empty: no voxel is inside it, so there is nothing to score")
    return tensor


def check_image(image: torch.Tensor) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(
            f"image must be a 2D slice (X, Y) or a 3D volume (X, Y, Z); got {image.ndim} "
            f"dimensions {tuple(image.shape)}"
        )
    if image.numel() == 0:
        raise ValueError(f"image is empty (shape {tuple(image.shape)})")


def check_same_shape(image: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if tuple(other.shape) != tuple(image.shape):
        raise ValueError(f"{name} has shape {tuple(other.shape)}, the image {tuple(image.shape)}; they must match")


def check_samples(image: torch.Tensor, samples: torch.Tensor) -> None:
    if samples.ndim != image.ndim + 1 or tuple(samples.shape[1:]) != tuple(image.shape):
        raise ValueError(
            f"samples must have shape (N, *image.shape) = (N, {', '.join(map(str, image.shape))}); "
            f"got {tuple(samples.shape)}"
        )
    if samples.shape[0] < 2:
        raise ValueError(f"at least 2 samples are needed to estimate a covariance; got N = {samples.shape[0]}")


def output_like(result: torch.Tensor, like) -> ArrayLike:
    """Return ``result`` as the same kind as ``like``, with its precision."""
    if isinstance(like, torch.Tensor):
        return result.to(like.dtype if like.is_floating_point() else torch.float32)
    array = result.detach().cpu().numpy()
    like_dtype = np.asarray(like).dtype if not isinstance(like, np.ndarray) else like.dtype
    if like_dtype == np.float64:
        return array.astype(np.float64, copy=False)
    return array.astype(np.float32, copy=False)


def ensemble_mean(reconstructions: ArrayLike | Sequence[ArrayLike]) -> ArrayLike:
    """Average of reconstructions made at an ensemble of noise levels.

    ``reconstructions`` is an array or tensor (M, *shape) or a sequence of M arrays or tensors
    of one shape; the result has that shape and the kind of the first member.
    """
    if isinstance(reconstructions, (np.ndarray, torch.Tensor)):
        # Already stacked: average along the first axis without splitting it up.
        device = device_of(reconstructions)
        stacked = as_tensor(reconstructions, "reconstructions", device, work_dtype(reconstructions))
        if stacked.ndim < 2 or stacked.shape[0] == 0:
            raise ValueError(
                f"ensemble_mean needs at least one reconstruction stacked along axis 0; got shape {tuple(stacked.shape)}"
            )
        return output_like(stacked.mean(dim=0), reconstructions)
    members = list(reconstructions)
    if not members:
        raise ValueError("ensemble_mean needs at least one reconstruction")
    device = device_of(*members)
    first = members[0]
    dtype = work_dtype(first)
    tensors = [as_tensor(member, f"reconstruction {i}", device, dtype) for i, member in enumerate(members)]
    shape = tuple(tensors[0].shape)
    for i, tensor in enumerate(tensors):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"reconstruction {i} has shape {tuple(tensor.shape)}, the first {shape}; they must match")
    return output_like(torch.stack(tensors).mean(dim=0), first)

