"""Reading and writing NIfTI scans without losing their geometry.

The two ends of the data flow, the scan coming in and the results going out: a scan is read
with nibabel, its original affine and header are kept untouched, and a *display* copy is made
in one fixed orientation so every scan looks upright in napari whatever its stored orientation.
Whatever is drawn or computed on the display grid is written back on the source's own grid
with its own affine.

Users bring a scan as a NIfTI file or as a folder holding a DICOM series;
``scan_reader.read_scan`` takes either. ``dicom.py`` reads a series into the same
:class:`NiftiVolume`, with a fresh NIfTI header carrying the series' exact affine, so from there
on a DICOM scan is a NIfTI scan and its masks are written as NIfTI on the series' own grid.
``dicom`` imports this module and this module never imports ``dicom``: the choice between
the two lives in ``scan_reader``.

The display orientation is I-P-L (array axis 0 runs towards inferior, axis 1 towards
posterior, axis 2 towards the patient's left). In napari that gives:
- axial slices with anterior at the top and the patient's right on the viewer's left
  (radiological convention);
- coronal and sagittal slices (after rolling the axes) with superior at the top;
- a right-handed frame, so the 3D view is not mirrored.

Going from the stored grid to the display grid only permutes and flips axes, so it is exact
both ways. Scans with an oblique or sheared affine are shown axis-aligned (napari cannot slice
an oblique affine) with a warning; their export is still exact because it undoes the same
permutation.

No Qt or napari import here: the napari reader and writers in ``_reader.py`` and ``_writer.py``
are thin wrappers around these functions.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from .errors import BrainUADError, OutputExists

DISPLAY_AXCODES = ("I", "P", "L")
"""Orientation of the display grid: the direction each array axis runs towards."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Obliquity (radians) above which a scan is called oblique; nibabel's own measure.
_OBLIQUE_TOLERANCE = 1e-3

# Maps scanner RAS+ coordinates (x, y, z) to the display world axes (I, P, L).
_RAS_TO_DISPLAY = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])


class ScanError(BrainUADError, ValueError):
    """A file cannot be used as a scan; the message names the file and the problem."""


class ScanWarning(UserWarning):
    """A scan was read, but something about it deserves the user's attention."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` or ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def scan_stem(source: str | os.PathLike) -> str:
    """What files written from a scan are named after: a NIfTI file's stem, or for a DICOM
    series its folder's name (with the series UID when the folder holds several), in
    characters every file system takes."""
    name = Path(source).name
    if is_nifti_path(name):
        return nifti_stem(name)
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "scan"


@dataclass
class NiftiGeometry:
    """Where a scan's voxels are, and how its display copy maps back onto them.

    Carried in napari layers as ``layer.metadata["nifti"]`` so writers can put any array drawn
    on the display grid back on the source grid.
    """

    source: str
    affine: np.ndarray  # the source's affine, as nibabel reads it
    shape: tuple[int, int, int]  # the source's spatial shape
    header: nib.Nifti1Header = field(repr=False)
    image_class: type = field(default=nib.Nifti1Image, repr=False)

    @property
    def source_ornt(self) -> np.ndarray:
        return io_orientation(self.affine)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Stored orientation, e.g. ('P', 'S', 'R')."""
        return tuple(nib.aff2axcodes(self.affine))

    @property
    def _to_display(self) -> np.ndarray:
        return ornt_transform(self.source_ornt, axcodes2ornt(DISPLAY_AXCODES))

    @property
    def _to_source(self) -> np.ndarray:
        return ornt_transform(axcodes2ornt(DISPLAY_AXCODES), self.source_ornt)

    @property
    def display_shape(self) -> tuple[int, int, int]:
        order = self._to_display[:, 0].astype(int)
        shape = [0, 0, 0]
        for source_axis, display_axis in enumerate(order):
            shape[display_axis] = self.shape[source_axis]
        return tuple(shape)

    @property
    def display_affine(self) -> np.ndarray:
        """Affine of the display grid (voxel index -> scanner mm)."""
        return self.affine @ inv_ornt_aff(self._to_display, self.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the source's own axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def display_scale(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.display_affine[:3, :3], axis=0))

    @property
    def display_translate(self) -> tuple[float, float, float]:
        """World position (mm, display axes) of the first display voxel.

        Scans of one subject on different grids therefore overlay in napari.
        """
        return tuple(float(v) for v in _RAS_TO_DISPLAY @ self.display_affine[:3, 3])

    @property
    def is_oblique(self) -> bool:
        """True when the affine is rotated away from the axes or sheared."""
        columns = self.affine[:3, :3]
        unit = columns / np.linalg.norm(columns, axis=0)
        sheared = not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4)
        return sheared or float(np.max(nib.affines.obliquity(self.affine))) > _OBLIQUE_TOLERANCE

    def to_display(self, source_array: np.ndarray) -> np.ndarray:
        """Reorient an array on the source grid to the display grid (exact, a view)."""
        self._check_shape(source_array, self.shape, "source")
        return apply_orientation(source_array, self._to_display)

    def to_source(self, display_array: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_display` (exact)."""
        self._check_shape(display_array, self.display_shape, "display")
        return apply_orientation(display_array, self._to_source)

    def _check_shape(self, array: np.ndarray, expected: tuple[int, ...], grid: str) -> None:
        if tuple(array.shape) != tuple(expected):
            raise ScanError(
                f"{self.source}: an array of shape {tuple(array.shape)} does not fit this "
                f"scan's {grid} grid of shape {tuple(expected)}"
            )

    def source_index_to_display_index(self, index) -> np.ndarray:
        """The display grid's (fractional) index of a source voxel index: axis 0 of the display
        grid is napari's axial slider."""
        source = np.append(np.asarray(index, dtype=float), 1.0)
        return np.linalg.solve(self.display_affine, self.affine @ source)[:3]

    def source_index_to_world(self, index) -> np.ndarray:
        """napari world coordinates (display axes, mm) of a (fractional) source voxel index."""
        display_index = self.source_index_to_display_index(index)
        return display_index * np.asarray(self.display_scale) + np.asarray(self.display_translate)

    def layer_kwargs(self) -> dict:
        """napari layer keyword arguments placing the display array in the world."""
        return {
            "scale": self.display_scale,
            "translate": self.display_translate,
            "metadata": {"nifti": self},
        }


@dataclass
class NiftiVolume:
    """A scan read from disk: voxel values on the source grid plus its geometry."""

    data: np.ndarray  # source grid, values as nibabel scales them (NaN/Inf replaced by 0)
    geometry: NiftiGeometry

    @property
    def path(self) -> str:
        return self.geometry.source

    def display_data(self) -> np.ndarray:
        return self.geometry.to_display(self.data)

    def looks_like_labels(self) -> bool:
        """Small non-negative integers only: a lesion, tumour or brain mask."""
        return looks_like_labels(self.data)


def looks_like_labels(data: np.ndarray, max_labels: int = 64) -> bool:
    """Whether every voxel is a (near-)integer in [0, 1000] with at most ``max_labels`` values.

    Some masks are stored with a scale factor and read back as 0.99999997 instead of 1, hence
    the tolerance.
    """
    if data.size == 0:
        return False
    if np.issubdtype(data.dtype, np.bool_):
        return True
    sample = data.ravel()[:: max(1, data.size // 100_000)]
    for values in (sample, data):  # a cheap look first, the whole volume only if it passes
        if values.min() < 0 or values.max() > 1000:
            return False
        if not np.issubdtype(values.dtype, np.integer):
            if np.max(np.abs(values - np.round(values))) > 1e-3:
                return False
        if len(np.unique(np.round(values))) > max_labels:
            return False
    return True


def as_label_array(data: np.ndarray) -> np.ndarray:
    """Integer array for a napari Labels layer (rounds masks stored with a scale factor)."""
    rounded = np.round(data) if not np.issubdtype(data.dtype, np.integer) else data
    dtype = np.uint8 if rounded.max(initial=0) < 256 else np.uint16
    return rounded.astype(dtype)


# The largest volume read: 2^28 voxels (1 GB as float32), eight times a 0.5 mm whole-head scan
# (about 480 × 480 × 350).
MAX_SCAN_VOXELS = 2**28


def read_nifti(path: str | os.PathLike, *, allow_empty: bool = False) -> NiftiVolume:
    """Read a 3D NIfTI scan, keeping its affine and header for export.

    Raises :class:`ScanError` naming the file and the problem for a missing file, a file that
    is not NIfTI, a truncated gzip, a 2D image, a 5D image, or (unless ``allow_empty``) a
    volume of zeros. Warns (:class:`ScanWarning`) and goes on for a 4D image (first volume),
    NaN/Inf voxels (set to 0, i.e. background) and an oblique or sheared affine.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise ScanError(f"{name}: file not found")
    if path.is_dir():
        raise ScanError(f"{name}: is a folder, not a NIfTI file")
    try:
        image = nib.load(name)
    except nib.filebasedimages.ImageFileError as error:
        raise ScanError(f"{name}: not a NIfTI image ({error})") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as error:
        raise ScanError(f"{name}: cannot be read, the file looks truncated or corrupt ({error})") from None
    except Exception as error:  # nibabel raises several kinds for malformed headers
        raise ScanError(f"{name}: not a readable NIfTI image ({error})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ScanError(f"{name}: is a {type(image).__name__}, not a NIfTI image")

    shape = image.shape
    if len(shape) < 3 or sum(n > 1 for n in shape[:3]) < 3:
        raise ScanError(f"{name}: is a 2D image of shape {shape}; a 3D volume is needed")
    if len(shape) > 4 and any(n > 1 for n in shape[4:]):
        raise ScanError(f"{name}: has {len(shape)} dimensions {shape}; a 3D volume is needed")
    voxels = int(np.prod([int(n) for n in shape[:3]], dtype=np.int64))
    if voxels > MAX_SCAN_VOXELS:
        # Checked from the header, before any voxel is read: a few hundred bytes of gzip can
        # declare a volume that fills any memory.
        raise ScanError(f"{name}: declares {' × '.join(str(n) for n in shape[:3])} voxels ({voxels / 1e6:.0f} million); "
                        f"no head MRI has more than {MAX_SCAN_VOXELS / 1e6:.0f} million, so it is not read")
    _check_affine(name, image.affine)

    try:
        if len(shape) > 3:
            volumes = int(np.prod(shape[3:]))
            if volumes > 1:
                warnings.warn(
                    f"{name}: is a 4D image with {volumes} volumes; using the first one",
                    ScanWarning,
                    stacklevel=2,
                )
            data = np.asarray(image.dataobj[(..., *([0] * (len(shape) - 3)))])
        else:
            data = np.asarray(image.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise ScanError(f"{name}: cannot be read, the file looks truncated or corrupt ({error})") from None

    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.bool_):
        # Scaled or floating data: float64, as nibabel's get_fdata gives, so thresholds applied
        # here and to the file agree voxel for voxel.
        data = data.astype(np.float64, copy=False)
        bad = ~np.isfinite(data)
        if bad.any():
            warnings.warn(
                f"{name}: {int(bad.sum())} voxels are NaN or infinite; treating them as background (0)",
                ScanWarning,
                stacklevel=2,
            )
            data = np.where(bad, 0.0, data)
    if not allow_empty and not np.any(data):
        raise ScanError(f"{name}: every voxel is zero; there is nothing to show or analyse")

    geometry = NiftiGeometry(
        source=name,
        affine=image.affine.copy(),
        shape=tuple(int(n) for n in shape[:3]),
        header=image.header.copy(),
        image_class=type(image),
    )
    warn_if_oblique(geometry)
    return NiftiVolume(data=data, geometry=geometry)


def _check_affine(name: str, affine: np.ndarray | None) -> None:
    """Refuse an affine that places no voxel anywhere: NaN or infinite entries, or axes that
    collapse (zero spacing, two axes along one line). Every map, mask and export is placed by it,
    so such a file cannot be analysed; its header, not the voxels, is what needs fixing."""
    if affine is None or not np.all(np.isfinite(affine)):
        raise ScanError(f"{name}: its header's affine (voxel-to-world matrix) holds NaN or infinite values; "
                        "fix the header (e.g. reconvert the DICOM series) before analysing it")
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(columns / spacing)) < 1e-3:
        raise ScanError(f"{name}: its header's affine gives voxels no volume (spacing "
                        f"{', '.join(f'{v:g}' for v in spacing)} mm, or two axes along one line); "
                        "fix the header before analysing it")


def warn_if_oblique(geometry: NiftiGeometry) -> None:
    """Warn that napari shows an oblique or sheared grid axis-aligned (it cannot slice it)."""
    if geometry.is_oblique:
        warnings.warn(
            f"{geometry.source}: the affine is oblique or sheared; napari shows it axis-aligned "
            "(orientation approximate), exported masks still use the exact original affine",
            ScanWarning,
            stacklevel=3,
        )


def save_on_source_grid(
    display_array: np.ndarray,
    geometry: NiftiGeometry,
    path: str | os.PathLike,
    *,
    kind: str = "labels",
    overwrite: bool = False,
) -> Path:
    """Write an array drawn on the display grid back on the source grid with its affine.

    ``kind`` is ``"labels"`` (integers) or ``"image"`` (float32). The file appears only once it
    is complete (written to a temporary name, then renamed), and an existing file is replaced
    only with ``overwrite=True``.
    """
    source_array = geometry.to_source(np.asarray(display_array))
    return save_source_array(source_array, geometry, path, kind=kind, overwrite=overwrite)


def save_source_array(
    source_array: np.ndarray,
    geometry: NiftiGeometry,
    path: str | os.PathLike,
    *,
    kind: str = "labels",
    overwrite: bool = False,
) -> Path:
    """Write an array already on the source grid, with the source's affine and header."""
    path = Path(path)
    if not is_nifti_path(path):
        raise ScanError(f"{path}: the file name must end in .nii.gz or .nii")
    if tuple(source_array.shape) != tuple(geometry.shape):
        raise ScanError(
            f"{path}: an array of shape {tuple(source_array.shape)} does not fit the grid of "
            f"{geometry.source} {tuple(geometry.shape)}"
        )
    if path.exists() and not overwrite:
        raise OutputExists(f"{path}: already exists; not overwriting it")
    if kind == "labels":
        values = np.asarray(source_array)
        if values.dtype == np.bool_:
            values = values.astype(np.uint8)
        if values.min(initial=0) < 0:
            raise ScanError(f"{path}: labels must not be negative")
        top = int(values.max(initial=0))
        dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
        values = values.astype(dtype)
    elif kind == "image":
        values = np.asarray(source_array, dtype=np.float32)
    else:
        raise ValueError(f"kind must be 'labels' or 'image', not {kind!r}")

    header = geometry.header.copy()
    header.set_data_dtype(values.dtype)
    header.set_slope_inter(1.0, 0.0)
    if len(header.get_data_shape()) != 3:
        header.set_data_shape(values.shape)
    image = geometry.image_class(values, None, header=header)
    # The header carries the source's sform and qform with their codes; keep both exactly.
    sform, sform_code = geometry.header.get_sform(coded=True)
    qform, qform_code = geometry.header.get_qform(coded=True)
    if sform is not None:
        image.set_sform(sform, int(sform_code))
    if qform is not None:
        image.set_qform(qform, int(qform_code))

    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    return write_atomically(path, lambda temporary: nib.save(image, temporary), suffix=suffix)


def write_atomically(path: str | os.PathLike, write, *, suffix: str = ".tmp") -> Path:
    """Call ``write(temporary)`` on a new file beside ``path``, then rename it onto ``path``: a
    reader sees the old file or the whole new one, and a failed or interrupted write leaves
    nothing behind. ``suffix`` is the temporary's (some writers choose the format by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(path, suffix)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def temporary_beside(path: Path, suffix: str) -> str:
    """A new empty file in ``path``'s folder, for writing there and renaming onto ``path``
    (atomic: a reader sees the old file or the whole new one). mkstemp creates it readable by
    the owner only; it gets the permissions a plain ``open()`` would give, umask included."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    os.chmod(temporary, plain_file_mode())
    return temporary


def plain_file_mode() -> int:
    """The permissions of a file made by ``open()``: 0o666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
