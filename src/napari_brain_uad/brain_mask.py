"""Where the brain is: the mask step 2 of the data flow crops, normalises and scores inside.

One of three, in this order:

1. **given** — the user's mask (a file, or a Labels layer they drew or corrected), always first;
2. **skull-stripped** — a scan whose skull was already removed is the brain and a constant
   background (0, or a negative number for scans z-scored after stripping, as BraTS ships
   them); it is recognised by its non-background voxels making no more than a brain's volume;
3. **extracted** — anything else has its skull on, and ``brain_extraction`` finds the brain.

Whatever its source, the mask must be brain-sized: an adult brain with its CSF is 1.0–2.0 L
and 120–180 mm along each axis. A mask below :data:`SMALLEST_BRAIN_ML` or spanning less than
:data:`SHORTEST_BRAIN_MM` along an axis (an empty or partial extraction: not a head, a scan
cropped to a few slices, a contrast the extractor cannot read — the extractor does find a
"brain" in a slab of neck) or above :data:`LARGEST_BRAIN_ML` (the skull is still in) is refused
with what was found — never a whole-head "brain" whose skull and scalp become findings.

No Qt or napari import here; torch only loads when a brain is extracted.
"""

from __future__ import annotations

from collections.abc import Callable
import warnings
from dataclasses import dataclass

import numpy as np

from .nifti import NiftiVolume, ScanError, ScanWarning

# An adult brain (with its CSF) is 1.0-2.0 litres; bounds with room for small and large heads.
SMALLEST_BRAIN_ML = 600.0
LARGEST_BRAIN_ML = 2500.0
# The shortest extent of a brain along any axis; the raw clinical scans' extracted brains span
# 117 mm and more even where their slices stop short of the cerebellum, a neck slab's "brain" 60.
SHORTEST_BRAIN_MM = 90.0

GIVEN, SKULL_STRIPPED, EXTRACTED = "given", "skull-stripped", "extracted"
# Voxels a model must not learn or be calibrated on as normal (a patient's lesions in a training
# or calibration scan, given as an exclusion mask) are grown by this much first: automatic
# lesion masks miss the lesions' faint rims, and a 2 mm model-space voxel straddles the edge of a
# native one.
EXCLUSION_GROWTH_MM = 4.0
# A brain is a rounded blob: it fills 43-53 % of its bounding box in every scan we hold (an
# ellipsoid fills 52 %); a cylinder fills 68 %, a box 100 %.
MOST_BRAIN_FILL = 0.65
# A scan is an image of something: neighbouring voxels inside the brain correlate (r 0.78-0.98
# along the best axis in every scan we hold, thick clinical slices included); in noise they do not.
LEAST_NEIGHBOUR_CORRELATION = 0.5


@dataclass(frozen=True)
class BrainMask:
    """A brain mask on the scan's grid, where it came from, and its volume."""

    mask: np.ndarray  # bool, the scan's source grid
    source: str = GIVEN  # GIVEN, SKULL_STRIPPED or EXTRACTED
    volume_ml: float = 0.0
    method: str = ""  # how it was found, for people: "deepbet 1.0.2", "non-background voxels", …

    def describe(self) -> str:
        how = f" by {self.method}" if self.source == EXTRACTED else ""
        return f"brain {self.source}{how}: {self.volume_ml:.0f} mL"


def voxel_ml(scan: NiftiVolume) -> float:
    return float(np.prod(scan.geometry.spacing)) / 1000.0


def background_value(data: np.ndarray) -> float:
    """The constant value around the brain of a skull-stripped scan: 0 for most, a negative
    number for scans z-scored after stripping (BraTS). Taken from the volume's outer faces."""
    faces = np.concatenate([np.ravel(face) for axis in range(3) for face in (
        np.take(data, 0, axis=axis), np.take(data, -1, axis=axis))])
    values, counts = np.unique(faces, return_counts=True)
    most = int(np.argmax(counts))
    return float(values[most]) if counts[most] > 0.5 * faces.size else 0.0


def non_background(data: np.ndarray) -> np.ndarray:
    """The voxels that differ from the constant background: the brain, if skull-stripped."""
    return np.asarray(data) != background_value(np.asarray(data))


def mask_on_scan_grid(given: NiftiVolume | np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
                      scan_name: str) -> np.ndarray:
    """A brain mask given for a scan, as booleans, refused unless it lies on the scan's grid
    (its shape, and its affine when it carries one)."""
    name = given.path if isinstance(given, NiftiVolume) else "the brain mask"
    mask_data = given.data if isinstance(given, NiftiVolume) else np.asarray(given)
    if mask_data.shape != tuple(shape):
        raise ScanError(f"{name}: the brain mask's grid {mask_data.shape} differs from the scan's "
                        f"{tuple(shape)} ({scan_name})")
    if isinstance(given, NiftiVolume) and not np.allclose(given.geometry.affine, affine, atol=1e-3):
        raise ScanError(f"{name}: the brain mask's affine differs from the scan's ({scan_name})")
    return mask_data > 0


def find_brain(
    scan: NiftiVolume,
    given: NiftiVolume | np.ndarray | None = None,
    *,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> BrainMask:
    """The scan's brain mask: ``given`` (on the scan's grid), else the scan's own
    non-background voxels if it is skull-stripped, else an extraction (``progress`` and
    ``cancelled`` as :func:`~napari_brain_uad.brain_extraction.extract_brain`). Refuses a mask
    that is not brain-sized."""
    per_voxel = voxel_ml(scan)
    if given is not None:
        mask = mask_on_scan_grid(given, scan.data.shape, scan.geometry.affine, scan.path)
        found = BrainMask(mask, GIVEN, float(np.count_nonzero(mask)) * per_voxel, "the user")
    else:
        stripped = non_background(scan.data)
        volume = float(np.count_nonzero(stripped)) * per_voxel
        if volume <= LARGEST_BRAIN_ML:
            found = BrainMask(stripped, SKULL_STRIPPED, volume, "non-background voxels")
        else:
            from .brain_extraction import EXTRACTOR, extract_brain

            mask = extract_brain(scan.data, scan.geometry.affine, device=device, progress=progress,
                                 cancelled=cancelled)
            found = BrainMask(mask, EXTRACTED, float(np.count_nonzero(mask)) * per_voxel, EXTRACTOR)
    check_brain_size(found, scan)
    check_head_mri(found, scan)
    return found


def grown_mask(mask: np.ndarray, spacing_mm, grow_mm: float = EXCLUSION_GROWTH_MM) -> np.ndarray:
    """``mask`` grown by ``grow_mm`` in every direction, in mm on a grid of ``spacing_mm`` (a
    number, or one per axis: thick slices grow by fewer voxels along the slice axis)."""
    mask = np.asarray(mask, dtype=bool)
    if grow_mm <= 0 or not mask.any():
        return mask.copy()
    from scipy import ndimage

    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (mask.ndim,))
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= grow_mm


def extent_mm(mask: np.ndarray, spacing) -> list[float]:
    """How far the mask reaches along each of its axes, in mm."""
    reach = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        reach.append(float((present.max() - present.min() + 1) * spacing[axis]) if present.size else 0.0)
    return reach


def box_fill(mask: np.ndarray) -> float:
    """The share of the mask's bounding box it fills."""
    from scipy import ndimage

    box = ndimage.find_objects(np.asarray(mask, dtype=np.uint8))[0]
    return float(np.asarray(mask)[box].mean())


def neighbour_correlation(data: np.ndarray, mask: np.ndarray) -> float:
    """The correlation of each voxel's intensity with its neighbour's, both inside ``mask``,
    along the axis where it is highest (thick slices lower it across them only)."""
    values, mask = np.asarray(data, dtype=np.float64), np.asarray(mask, dtype=bool)
    best = -1.0
    for axis in range(values.ndim):
        head = [slice(None)] * values.ndim
        tail = [slice(None)] * values.ndim
        head[axis], tail[axis] = slice(0, -1), slice(1, None)
        both = mask[tuple(head)] & mask[tuple(tail)]
        first, second = values[tuple(head)][both], values[tuple(tail)][both]
        if first.size > 100 and first.std() > 0 and second.std() > 0:
            best = max(best, float(np.corrcoef(first, second)[0, 1]))
    return best


def check_head_mri(found: BrainMask, scan: NiftiVolume) -> None:
    """Refuse a scan that is not a head MRI, whatever the size of what was taken for its brain:
    intensities that do not correlate between neighbouring voxels (noise), or a found brain that
    is no rounded blob (a cylinder, a box). A mask the user gave may have any shape."""
    what = {GIVEN: "inside the brain mask given", SKULL_STRIPPED: "inside the skull-stripped brain",
            EXTRACTED: f"inside what brain extraction ({found.method}) found"}[found.source]
    correlation = neighbour_correlation(scan.data, found.mask)
    if correlation < LEAST_NEIGHBOUR_CORRELATION:
        raise ScanError(f"{scan.path}: this does not look like a head MRI scan: {what}, neighbouring voxels' "
                        f"intensities hardly correlate (r = {correlation:.2f}; every brain scan we hold has "
                        f"r ≥ 0.78): noise, or a file that is not an image; nothing was analysed")
    if found.source != GIVEN:
        fill = box_fill(found.mask)
        if fill > MOST_BRAIN_FILL:
            raise ScanError(f"{scan.path}: this does not look like a head MRI scan: what was taken for the brain "
                            f"({found.volume_ml:.0f} mL) fills {100 * fill:.0f} % of its bounding box, where a "
                            "brain fills about half (a rounded shape); nothing was analysed. If it is a brain, "
                            "give a brain mask")


def check_brain_size(found: BrainMask, scan: NiftiVolume) -> None:
    """Refuse a brain mask the scan gave (skull-stripped or extracted) that is far too small, too
    short or too large for an adult brain, saying what it holds. A mask the user gave is theirs
    to choose (a part of the brain, a child's brain): it gets a warning instead, unless empty."""
    what = {GIVEN: "the brain mask given", SKULL_STRIPPED: "the skull-stripped brain",
            EXTRACTED: f"brain extraction ({found.method})"}[found.source]
    if found.volume_ml == 0:
        raise ScanError(f"{scan.path}: {what} holds no brain at all; is this a head MRI scan?")
    if found.volume_ml > LARGEST_BRAIN_ML and found.source != GIVEN:
        raise ScanError(f"{scan.path}: {what} holds {found.volume_ml:.0f} mL, more than any brain: the skull "
                        "or the scalp is still in it; give a brain mask")
    shortest = min(extent_mm(found.mask, scan.geometry.spacing))
    problem = None
    if found.volume_ml < SMALLEST_BRAIN_ML:
        problem = f"holds {found.volume_ml:.0f} mL, far less than an adult brain (1000–2000 mL)"
    elif shortest < SHORTEST_BRAIN_MM:
        problem = (f"spans only {shortest:.0f} mm along one axis ({found.volume_ml:.0f} mL), where a brain "
                   "spans 120–180 mm")
    elif found.volume_ml > LARGEST_BRAIN_ML:
        problem = f"holds {found.volume_ml:.0f} mL, more than any brain"
    if problem is None:
        return
    if found.source == GIVEN:
        warnings.warn(f"{scan.path}: {what} {problem}; only the voxels inside it are scored", ScanWarning,
                      stacklevel=3)
        return
    hint = ("is the whole head in the scan? A few slices, another body part or a contrast the extractor "
            "cannot read give a partial brain; give a brain mask" if found.source == EXTRACTED
            else "does the scan cover the whole brain? Give a brain mask if it does")
    raise ScanError(f"{scan.path}: {what} {problem}; {hint}")
