"""The residual |x − x̂|, both ways or one way (the lesion's direction in a contrast).

Conventions (inputs, outputs, masks) as every score's: see ``scoring.arrays``.
"""

from __future__ import annotations

import torch

from .arrays import ArrayLike, as_mask, as_tensor, check_image, check_same_shape, device_of, output_like, work_dtype

LESION_DIRECTIONS = ("both", "darker", "brighter")
"""Which deviations a residual counts: both ways, or only the scan darker / brighter than its
reconstruction (lesions go one way in a given contrast: most MS lesions dark on T1, bright on
T2 and FLAIR)."""

__all__ = ["LESION_DIRECTIONS", "residual"]


def residual(
    image: ArrayLike, reconstruction: ArrayLike, mask: ArrayLike | None = None, direction: str = "both"
) -> ArrayLike:
    """|x − x̂| per voxel; 0 outside ``mask`` when one is given.

    ``direction`` counts only deviations one way: ``"darker"`` keeps x̂ − x where the scan is
    darker than its reconstruction (most MS lesions on T1), ``"brighter"`` x − x̂ where it is
    brighter (lesions on T2 and FLAIR); the other voxels score 0."""
    if direction not in LESION_DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(LESION_DIRECTIONS)}, not {direction!r}")
    device = device_of(image, reconstruction)
    x = as_tensor(image, "image", device, work_dtype(image))
    check_image(x)
    y = as_tensor(reconstruction, "reconstruction", device, x.dtype)
    check_same_shape(x, y, "reconstruction")
    inside = as_mask(mask, x.shape, device)
    difference = x - y
    if direction == "both":
        result = difference.abs()
    else:
        result = (difference if direction == "brighter" else -difference).clamp(min=0)
    if inside is not None:
        result = torch.where(inside, result, torch.zeros_like(result))
    return output_like(result, image)

