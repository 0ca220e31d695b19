"""Model space, both ways: step 2 of the data flow (native scan -> model input) and step 6
(a map computed in model space -> the native grid).

Model space, as in the papers: canonical RAS orientation, isotropic voxels of ``spacing_mm``
(2 mm), cropped to the brain and padded to ``in_plane`` (96 x 96) axial slices, intensities
mapped to [0, 1] by the 1st/99th percentile inside the brain and clipped, 0 outside the brain.
Models that ask for it (``bias_correction = "n4"``, as the thesis does for every scan) first
have the scan's bias field removed by N4 (``bias_field``). The model reads axial slices
``volume[:, :, k]`` (axes R, A).

Every geometric step (reorientation, resampling, crop and pad) is a map between voxel indices,
so the whole chain is recorded as one affine matrix from model voxels to native voxels plus
the numbers of each step (:class:`ModelSpaceTransform`). Going forward samples the native scan
at the model voxels' native positions; going back samples the model map at the native voxels'
model positions. Both are a single interpolation, with no intermediate copy.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from .bias_field import BiasCorrectionSkipped, n4_bias_field
from .brain_mask import LARGEST_BRAIN_ML, mask_on_scan_grid, non_background
from .nifti import NiftiVolume, ScanError, ScanWarning

# Slices up to this many times the model's spacing (6 mm at 2 mm) still give usable maps: on
# healthy IXI scans thickened by averaging, the share flagged at the healthy threshold went from
# 0.3 % (2 mm) to 0.9 % (4 and 6 mm) and 1.8 % (8 mm), and [Dice] on synthetic lesions from
# 0.48 to 0.38-0.40 and 0.33 (benchmarks/bench_slice_thickness.py). Thicker ones get a warning.
MAX_SLICE_THICKNESS_RATIO = 3.0
BIAS_CORRECTIONS = (None, "n4")


MODEL_SPACING_RANGE_MM = (0.5, 8.0)
SLICE_SIZE_RANGE = (16, 1024)


@dataclass(frozen=True)
class ModelSpaceSpec:
    """What a model expects; stored with every model."""

    spacing_mm: float = 2.0
    in_plane: tuple[int, int] = (96, 96)
    percentiles: tuple[float, float] = (1.0, 99.0)
    # The contrast the model was trained on; the widget warns when a scan looks different.
    modality: str = "T1"
    # "n4": remove the bias field before normalising (bias_field.py); None: leave intensities.
    bias_correction: str | None = None

    def __post_init__(self):
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"unknown bias correction {self.bias_correction!r}; known: n4, or none")
        # A model space is a brain-sized grid: a card asking for 0.01 mm voxels or 10⁵-pixel
        # slices would make a volume no memory holds before anything else could object.
        low, high = MODEL_SPACING_RANGE_MM
        if not low <= float(self.spacing_mm) <= high:
            raise ValueError(f"model-space voxels of {self.spacing_mm} mm; they must be {low}-{high} mm")
        if len(self.in_plane) != 2 or not all(SLICE_SIZE_RANGE[0] <= int(n) <= SLICE_SIZE_RANGE[1]
                                              for n in self.in_plane):
            raise ValueError(f"model-space slices of {tuple(self.in_plane)} pixels; each side must be "
                             f"{SLICE_SIZE_RANGE[0]}-{SLICE_SIZE_RANGE[1]}")

    def to_dict(self) -> dict:
        return {
            "spacing_mm": self.spacing_mm,
            "in_plane": list(self.in_plane),
            "percentiles": list(self.percentiles),
            "modality": self.modality,
            "bias_correction": self.bias_correction,
        }

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpaceSpec":
        return cls(
            spacing_mm=float(values["spacing_mm"]),
            in_plane=tuple(int(n) for n in values["in_plane"]),
            percentiles=tuple(float(p) for p in values["percentiles"]),
            modality=str(values.get("modality", "T1")),
            # Models from before the setting existed were trained without correction.
            bias_correction=values.get("bias_correction"),
        )


@dataclass(frozen=True)
class ModelSpaceTransform:
    """Record of every step from a native scan to model space, enough to undo them exactly."""

    native_shape: tuple[int, int, int]
    to_canonical: tuple[tuple[float, float], ...]  # nibabel ornt transform, native -> RAS axes
    canonical_spacing: tuple[float, float, float]  # mm, RAS axes
    resampled_shape: tuple[int, int, int]  # the whole scan at spacing_mm
    crop_start: tuple[int, int, int]  # first model voxel in the resampled grid (< 0: padding)
    model_shape: tuple[int, int, int]
    spacing_mm: float
    intensity_low: float  # native intensity mapped to 0
    intensity_high: float  # native intensity mapped to 1

    @property
    def zoom(self) -> np.ndarray:
        """Canonical voxels per model voxel along each axis."""
        return self.spacing_mm / np.asarray(self.canonical_spacing)

    def model_to_native(self) -> np.ndarray:
        """4x4 matrix taking a model voxel index to the native voxel index at its centre."""
        crop = np.eye(4)
        crop[:3, 3] = self.crop_start
        # Resampled voxel r covers canonical voxels [r f - 0.5, (r + 1) f - 0.5]; its centre is
        # at (r + 0.5) f - 0.5, so both grids span the same extent.
        resample = np.diag([*self.zoom, 1.0])
        resample[:3, 3] = 0.5 * self.zoom - 0.5
        # inv_ornt_aff(t, shape) maps indices of the reoriented array back to the original's.
        canonical_to_native = inv_ornt_aff(np.asarray(self.to_canonical), self.native_shape)
        return canonical_to_native @ resample @ crop

    def to_model(self, native: np.ndarray, *, order: int = 1, antialias: bool = True) -> np.ndarray:
        """Resample an array on the native grid into model space (float32)."""
        native = np.asarray(native, dtype=np.float32)
        if native.shape != tuple(self.native_shape):
            raise ScanError(
                f"an array of shape {native.shape} is not on this scan's grid {tuple(self.native_shape)}"
            )
        if antialias:
            native = _antialias(native, self)
        matrix = self.model_to_native()
        return ndimage.affine_transform(
            native, matrix[:3, :3], offset=matrix[:3, 3], output_shape=self.model_shape,
            order=order, mode="constant", cval=0.0, prefilter=False,
        )

    def to_native(self, model: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Resample an array in model space back onto the native grid (0 outside model space)."""
        model = np.asarray(model, dtype=np.float32)
        if model.shape != tuple(self.model_shape):
            raise ScanError(f"an array of shape {model.shape} is not in this model space {self.model_shape}")
        matrix = np.linalg.inv(self.model_to_native())
        return ndimage.affine_transform(
            model, matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(self.native_shape),
            order=order, mode="constant", cval=0.0, prefilter=False,
        )

    def intensity_to_native(self, values: np.ndarray) -> np.ndarray:
        """Undo the [0, 1] intensity mapping (e.g. to show a reconstruction in scan units)."""
        return np.asarray(values) * (self.intensity_high - self.intensity_low) + self.intensity_low

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpaceTransform":
        return cls(
            native_shape=tuple(values["native_shape"]),
            to_canonical=tuple(tuple(row) for row in values["to_canonical"]),
            canonical_spacing=tuple(values["canonical_spacing"]),
            resampled_shape=tuple(values["resampled_shape"]),
            crop_start=tuple(values["crop_start"]),
            model_shape=tuple(values["model_shape"]),
            spacing_mm=float(values["spacing_mm"]),
            intensity_low=float(values["intensity_low"]),
            intensity_high=float(values["intensity_high"]),
        )


@dataclass
class ModelSpaceVolume:
    """A scan in model space: the model's input, its brain mask, and how to go back."""

    image: np.ndarray  # float32 (X, Y, Z), RAS axes, in [0, 1], 0 outside the brain
    brain_mask: np.ndarray  # bool, same shape
    transform: ModelSpaceTransform
    bias_field: np.ndarray | None = None  # removed before normalising (median 1 in the brain), or None

    def axial_slices(self) -> np.ndarray:
        """(Z, X, Y) stack of the model's input slices."""
        return np.moveaxis(self.image, 2, 0)

    def to_scan_intensities(self, values: np.ndarray, *, difference: bool = False) -> np.ndarray:
        """Model-space values in [0, 1] (a reconstruction) back in the scan's own intensities, still
        in model space: the normalisation undone, and the bias field put back. ``difference``:
        the values are differences or spreads, so only the scale applies, not the offset."""
        transform = self.transform
        scan_units = (np.asarray(values) * np.float32(transform.intensity_high - transform.intensity_low)
                      if difference else transform.intensity_to_native(values))
        if self.bias_field is not None:
            scan_units = scan_units * self.bias_field
        return scan_units.astype(np.float32)


def _antialias(native: np.ndarray, transform: ModelSpaceTransform) -> np.ndarray:
    """Gaussian pre-filter before downsampling, so fine texture does not alias into the model grid."""
    canonical_axis_of = np.asarray(transform.to_canonical)[:, 0].astype(int)
    zoom = transform.zoom
    sigma = [max(0.0, (zoom[canonical_axis_of[axis]] - 1.0) / 2.0) for axis in range(3)]
    if max(sigma) <= 0:
        return native
    return ndimage.gaussian_filter(native, sigma=sigma, mode="nearest")


def to_model_space(
    scan: NiftiVolume | np.ndarray,
    affine: np.ndarray | None = None,
    brain_mask: NiftiVolume | np.ndarray | None = None,
    spec: ModelSpaceSpec = ModelSpaceSpec(),
) -> ModelSpaceVolume:
    """Bring a native scan into model space, recording every step.

    ``scan`` is a :class:`NiftiVolume` (its affine is used) or an array with ``affine``.
    ``brain_mask`` is on the scan's grid; without it the voxels that differ from the constant
    background are the brain, which is right for skull-stripped scans only (a warning says so
    otherwise; ``brain_mask.find_brain`` chooses the mask for users' scans).
    """
    if isinstance(scan, NiftiVolume):
        name, data, affine = scan.path, scan.data, scan.geometry.affine
    else:
        name, data = "scan", np.asarray(scan)
        if affine is None:
            raise ValueError("an affine is needed with an array scan")
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if data.ndim != 3:
        raise ScanError(f"{name}: a 3D volume is needed, got shape {data.shape}")

    if brain_mask is None:
        mask = non_background(data)
        volume_ml = mask.sum() * float(np.prod(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))) / 1000.0
        if volume_ml > LARGEST_BRAIN_ML:
            warnings.warn(
                f"{name}: the voxels that differ from the background make {volume_ml / 1000:.1f} L, "
                "more than any brain, so the scan does not look skull-stripped; without a brain "
                "mask the whole head is treated as brain",
                ScanWarning,
                stacklevel=2,
            )
    else:
        mask = mask_on_scan_grid(brain_mask, data.shape, affine, name)
    if not mask.any():
        raise ScanError(f"{name}: the brain mask is empty")

    to_canonical = ornt_transform(io_orientation(affine), axcodes2ornt(("R", "A", "S")))
    native_spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    thickest = float(native_spacing.max())
    if thickest > MAX_SLICE_THICKNESS_RATIO * spec.spacing_mm + 1e-3:
        warnings.warn(
            f"{name}: its voxels are {thickest:.3g} mm thick along one axis; the model works at "
            f"{spec.spacing_mm:g} mm and its maps are unreliable beyond "
            f"{MAX_SLICE_THICKNESS_RATIO * spec.spacing_mm:g} mm slices (more false alarms, small "
            "lesions lost): use a thinner acquisition if there is one",
            ScanWarning,
            stacklevel=2,
        )
    canonical_spacing = np.zeros(3)
    canonical_shape = [0, 0, 0]
    for native_axis, (canonical_axis, _) in enumerate(to_canonical):
        canonical_spacing[int(canonical_axis)] = native_spacing[native_axis]
        canonical_shape[int(canonical_axis)] = data.shape[native_axis]
    resampled_shape = tuple(
        max(1, int(round(n * s / spec.spacing_mm))) for n, s in zip(canonical_shape, canonical_spacing)
    )

    # First pass: the brain mask over the whole resampled grid, to find the brain's extent.
    whole = ModelSpaceTransform(
        native_shape=tuple(data.shape),
        to_canonical=tuple(tuple(float(v) for v in row) for row in to_canonical),
        canonical_spacing=tuple(float(s) for s in canonical_spacing),
        resampled_shape=resampled_shape,
        crop_start=(0, 0, 0),
        model_shape=resampled_shape,
        spacing_mm=float(spec.spacing_mm),
        intensity_low=0.0,
        intensity_high=1.0,
    )
    resampled_mask = whole.to_model(mask, antialias=False) >= 0.5
    if not resampled_mask.any():
        raise ScanError(f"{name}: the brain is smaller than one {spec.spacing_mm} mm voxel")
    occupied = np.nonzero(resampled_mask)
    low = np.array([axis.min() for axis in occupied])
    high = np.array([axis.max() for axis in occupied]) + 1
    extent = high - low
    model_shape = (int(spec.in_plane[0]), int(spec.in_plane[1]), int(extent[2]))
    crop_start = [int(low[a] + extent[a] // 2 - model_shape[a] // 2) for a in range(2)] + [int(low[2])]
    if extent[0] > model_shape[0] or extent[1] > model_shape[1]:
        warnings.warn(
            f"{name}: the brain spans {extent[0]} x {extent[1]} voxels of {spec.spacing_mm} mm, more "
            f"than the model's {model_shape[0]} x {model_shape[1]}; its edges are cut off",
            ScanWarning,
            stacklevel=2,
        )

    geometry_only = ModelSpaceTransform(**{**whole.to_dict(), "crop_start": tuple(crop_start), "model_shape": model_shape})
    model_mask = geometry_only.to_model(mask, antialias=False) >= 0.5
    model_image = geometry_only.to_model(data, antialias=True)

    bias = None
    if spec.bias_correction == "n4":
        try:
            bias = n4_bias_field(model_image, model_mask)
        except BiasCorrectionSkipped as reason:
            warnings.warn(f"{name}: no bias field correction: {reason}", ScanWarning, stacklevel=2)
        else:
            model_image = model_image / bias

    brain_values = model_image[model_mask]
    intensity_low, intensity_high = (float(v) for v in np.percentile(brain_values, spec.percentiles))
    if intensity_high <= intensity_low:
        raise ScanError(f"{name}: the brain has no contrast (all voxels are {intensity_low:g})")
    transform = ModelSpaceTransform(
        **{**geometry_only.to_dict(), "intensity_low": intensity_low, "intensity_high": intensity_high}
    )
    normalised = np.clip((model_image - intensity_low) / (intensity_high - intensity_low), 0.0, 1.0)
    normalised[~model_mask] = 0.0
    return ModelSpaceVolume(image=normalised.astype(np.float32), brain_mask=model_mask, transform=transform,
                            bias_field=bias)
