"""Reading a DICOM series as a scan, with the exact geometry of its slices.

Scanners and PACS exports give a scan as a folder of DICOM files, one file per slice. Such a
folder becomes a :class:`~napari_brain_uad.nifti.NiftiVolume` like any NIfTI scan, so everything
downstream works on it unchanged, and masks drawn or computed on it are written as NIfTI on the
series' own grid (``nifti.save_source_array``), where they overlay the series voxel for voxel.

DICOM places every slice by itself, in the patient's LPS frame (x towards the patient's left,
y towards posterior, z towards superior): ImagePositionPatient is the centre of the slice's
first pixel, ImageOrientationPatient the directions along a row and down a column, and
PixelSpacing the distances between rows and between columns. The volume's affine is built from
these tags alone:

- array axis 0 is the column index (moving along a row), axis 1 the row index, axis 2 the slice;
- the slices are sorted by position along the normal of their plane, then run in the direction
  in which their InstanceNumber grows (when the files have one), so array slice k is the k-th
  image a DICOM viewer shows; the origin is the first slice's position;
- the slice axis is the actual step from one slice position to the next, not the plane's
  normal scaled by SliceThickness (which is the slab thickness, not the spacing, and a gantry
  tilt would make the two differ);
- LPS becomes NIfTI's RAS by negating the first two rows.

Every voxel therefore lies where the DICOM files say, which holds only if the slices form one
regular grid; so the series is checked first, and a series that is not one (missing slices,
uneven spacing, mixed orientations, several volumes mixed together, a single slice) is refused
with a message naming the problem and the files concerned, rather than read onto a wrong grid.

SimpleITK (GDCM) finds the series and decodes the pixels, applying each file's rescale slope
and intercept. No Qt or napari import here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .nifti import NiftiGeometry, NiftiVolume, ScanError, ScanWarning, warn_if_oblique

_POSITION = "0020|0032"  # ImagePositionPatient
_ORIENTATION = "0020|0037"  # ImageOrientationPatient
_PIXEL_SPACING = "0028|0030"  # PixelSpacing
_DESCRIPTION = "0008|103e"  # SeriesDescription
_INSTANCE_NUMBER = "0020|0013"  # InstanceNumber
_TAG_NAMES = {
    _POSITION: "ImagePositionPatient", _ORIENTATION: "ImageOrientationPatient", _PIXEL_SPACING: "PixelSpacing"
}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Positions are decimal strings with a handful of digits, so neighbouring gaps differ by a
# rounding; 2% of the slice spacing allows that and keeps every voxel within 1/50 of a slice of
# where its file says it is.
_SPACING_TOLERANCE = 0.02

# Direction cosines that differ by more than this are different orientations (about 0.006°).
_ORIENTATION_TOLERANCE = 1e-4

# Pixel spacings (mm) that differ by more than this are different grids.
_PIXEL_SPACING_TOLERANCE = 1e-3

# A gap this many times the usual spacing is a missing slice rather than uneven spacing.
_MISSING_SLICE_GAP = 1.5

# How many files holds_dicom looks at: napari asks it of every folder dropped on the viewer.
_FILES_LOOKED_AT = 16


@dataclass(frozen=True)
class DicomSeries:
    """One series in a folder: what tells series apart, and its files."""

    uid: str
    description: str
    files: tuple[str, ...]

    def summary(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {len(self.files)} files)"


@dataclass
class _Slice:
    """One file of a series: where its plane lies and its (rescaled) pixels."""

    file: str
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: along a row, then down a column
    pixel_spacing: np.ndarray  # mm between rows, then between columns
    pixels: np.ndarray  # (rows, columns)
    number: int | None  # InstanceNumber, where the file has one

    @property
    def name(self) -> str:
        return Path(self.file).name


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether SimpleITK recognises the file as DICOM (reads its header only)."""
    return sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO"


def holds_dicom(folder: str | os.PathLike) -> bool:
    """Whether a folder holds DICOM files, judged cheaply from its first few files."""
    return any(is_dicom_file(file) for file in _files(folder)[:_FILES_LOOKED_AT])


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series directly in ``folder`` (not in its subfolders), the largest first."""
    folder = str(folder)
    if not any(is_dicom_file(file) for file in _files(folder)):
        return []  # spares the user GDCM's own "No Series were found" on the console
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        found.append(DicomSeries(uid=uid, description=_description(files[0]), files=files))
    return sorted(found, key=lambda series: len(series.files), reverse=True)


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, *, allow_empty: bool = False
) -> NiftiVolume:
    """Read one DICOM series from a folder as a scan on the series' own grid.

    ``series_uid`` picks a series; without it the folder's largest series is read, with a
    :class:`ScanWarning` naming the others when there are several. Raises :class:`ScanError`
    for a folder without DICOM series, an unknown UID, an unreadable file, a single slice or a
    multi-frame file, slices of different orientations or grids, two slices at one position,
    missing slices, uneven spacing, and (unless ``allow_empty``) a volume of zeros.
    """
    name = str(folder)
    if not Path(folder).is_dir():
        raise ScanError(f"{name}: folder not found")
    found = list_series(folder)
    if not found:
        raise ScanError(
            f"{name}: no DICOM series in this folder (the DICOM files must lie in the folder "
            "itself, not in its subfolders)"
        )
    series = _choose_series(found, series_uid, name)
    source = name if len(found) == 1 else f"{name} (series {series.uid})"

    slices = [_read_slice(file, source) for file in series.files]
    if len(slices) == 1:
        raise ScanError(f"{source}: the series is a single 2D slice ({slices[0].name}); a 3D volume is needed")
    _check_one_plane(slices, source)
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    slices.sort(key=lambda one: float(one.position @ normal))
    _check_even_spacing(slices, normal, source)
    if _numbered_backwards(slices):
        slices.reverse()
    affine = _ras_affine(slices)

    data = np.stack([one.pixels.T for one in slices], axis=-1)
    if not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float64)  # as read_nifti gives scaled data
    if not allow_empty and not np.any(data):
        raise ScanError(f"{source}: every voxel is zero; there is nothing to show or analyse")
    geometry = NiftiGeometry(
        source=source,
        affine=affine,
        shape=tuple(int(n) for n in data.shape),
        header=_nifti_header(affine, data, series.description),
    )
    warn_if_oblique(geometry)
    return NiftiVolume(data=data, geometry=geometry)


def series_description(volume: NiftiVolume) -> str:
    """The SeriesDescription of a volume read by :func:`read_dicom_series` (kept in its header)."""
    return header_description(volume.geometry)


def header_description(geometry: NiftiGeometry) -> str:
    """The description in a scan's header: for a series read by :func:`read_dicom_series`, its
    SeriesDescription (a napari layer of it carries the geometry)."""
    return geometry.header["descrip"].item().decode("ascii", "replace").strip()


def folder_series_description(folder: str | os.PathLike, series_uid: str | None = None) -> str:
    """The SeriesDescription of the series :func:`read_dicom_series` would read from ``folder``
    (``series_uid``, else the largest), from the files' headers alone; empty when there is none
    or no such series (reading it reports why)."""
    found = list_series(folder)
    if series_uid is not None:
        found = [series for series in found if series.uid == series_uid.strip()]
    return found[0].description if found else ""


def _files(folder: str | os.PathLike) -> list[str]:
    """The folder's files (not hidden ones, not subfolders), sorted; none if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.path for entry in entries if entry.is_file() and not entry.name.startswith("."))
    except OSError:
        return []


def _description(file: str) -> str:
    """A file's SeriesDescription; empty when it has none (or the file is unreadable, which
    reading the series then reports)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData(_DESCRIPTION).strip()
    except RuntimeError:
        return ""


def _choose_series(found: list[DicomSeries], series_uid: str | None, name: str) -> DicomSeries:
    if series_uid is not None:
        for series in found:
            if series.uid == series_uid.strip():
                return series
        holds = "; ".join(series.summary() for series in found)
        raise ScanError(f"{name}: no DICOM series with UID {series_uid}; the folder holds {holds}")
    largest, others = found[0], found[1:]
    if others:
        warnings.warn(
            f"{name}: holds {len(found)} DICOM series; reading the largest, {largest.summary()}. "
            f"The others: {'; '.join(series.summary() for series in others)}. To read another, "
            "give its UID (--series UID on the command line) or put its files in a folder of their own",
            ScanWarning,
            stacklevel=3,
        )
    return largest


def _read_slice(file: str, source: str) -> _Slice:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise ScanError(f"{source}: {Path(file).name} cannot be read as DICOM ({reason})") from None
    size = image.GetSize()
    if len(size) == 3 and size[2] > 1:
        raise ScanError(
            f"{source}: {Path(file).name} is a multi-frame file ({size[2]} frames); only series "
            "of one file per slice can be read, so export the series as single-frame (classic) DICOM"
        )
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ScanError(f"{source}: {Path(file).name} is a colour image; an MRI slice is needed")
    return _Slice(
        file=file,
        position=_numbers(reader, _POSITION, 3, file, source),
        orientation=_numbers(reader, _ORIENTATION, 6, file, source),
        pixel_spacing=_numbers(reader, _PIXEL_SPACING, 2, file, source),
        pixels=sitk.GetArrayFromImage(image).reshape(size[1], size[0]),
        number=_instance_number(reader),
    )


def _instance_number(reader: sitk.ImageFileReader) -> int | None:
    text = reader.GetMetaData(_INSTANCE_NUMBER) if reader.HasMetaDataKey(_INSTANCE_NUMBER) else ""
    try:
        return int(text)
    except ValueError:  # absent, or not a number
        return None


def _numbers(reader: sitk.ImageFileReader, tag: str, count: int, file: str, source: str) -> np.ndarray:
    """A tag's backslash-separated decimal values, or a ScanError when they are absent or malformed."""
    text = reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else ""
    try:
        values = np.array([float(value) for value in text.split("\\")])
    except ValueError:
        values = np.array([])
    if values.shape != (count,):
        raise ScanError(
            f"{source}: {Path(file).name} has no valid {_TAG_NAMES[tag]} ({tag}: {text.strip()!r}); "
            "the slice cannot be placed in space"
        )
    return values


def _check_one_plane(slices: list[_Slice], source: str) -> None:
    """Every slice parallel to the first, with the same rows, columns and pixel spacing."""
    first = slices[0]
    turned = [one for one in slices if np.max(np.abs(one.orientation - first.orientation)) > _ORIENTATION_TOLERANCE]
    if turned:
        raise ScanError(
            f"{source}: mixed slice orientations: {len(turned)} of {len(slices)} slices are "
            f"oriented differently from {first.name} (e.g. {turned[0].name}: ImageOrientationPatient "
            f"{_listed(turned[0].orientation)} instead of {_listed(first.orientation)}); a 3D series "
            "is one stack of parallel slices (a localiser or multi-plane series is not)"
        )
    misfits = [
        one for one in slices
        if one.pixels.shape != first.pixels.shape
        or np.max(np.abs(one.pixel_spacing - first.pixel_spacing)) > _PIXEL_SPACING_TOLERANCE
    ]
    if misfits:
        odd = misfits[0]
        raise ScanError(
            f"{source}: slices on different grids: {odd.name} has {_grid(odd)} but {first.name} "
            f"has {_grid(first)}; a 3D series needs the same grid in every slice"
        )


def _check_even_spacing(slices: list[_Slice], normal: np.ndarray, source: str) -> None:
    """The slices, sorted along ``normal``, lie evenly spaced along one line: no two at one
    position, none missing, none out of step."""
    positions = np.array([one.position for one in slices])
    gaps = np.diff(positions @ normal)
    spacing = float(np.median(gaps))
    tolerance = _SPACING_TOLERANCE * spacing
    closest = int(np.argmin(gaps))
    if gaps[closest] <= tolerance:
        raise ScanError(
            f"{source}: {slices[closest].name} and {slices[closest + 1].name} lie at the same "
            "position; the series holds more than one volume (several echoes, time points or "
            "b-values?), which cannot be read as one 3D scan"
        )
    widest = int(np.argmax(gaps))
    if gaps[widest] > _MISSING_SLICE_GAP * spacing:
        missing = max(1, round(gaps[widest] / spacing) - 1)
        raise ScanError(
            f"{source}: missing slices: a gap of {gaps[widest]:.2f} mm between "
            f"{slices[widest].name} and {slices[widest + 1].name} where the slices are "
            f"{spacing:.2f} mm apart (about {missing} missing); export the complete series"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    off_grid = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(positions)), step)), axis=1)
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > tolerance:
        raise ScanError(
            f"{source}: uneven slice spacing: neighbouring slices are {gaps.min():.3f} to "
            f"{gaps.max():.3f} mm apart and {slices[worst].name} lies {off_grid[worst]:.3f} mm "
            "from a regular grid; a 3D scan needs evenly spaced slices"
        )


def _numbered_backwards(slices: list[_Slice]) -> bool:
    """Whether the InstanceNumbers fall along the slices, so the array should run the other way."""
    first, last = slices[0].number, slices[-1].number
    return first is not None and last is not None and first > last


def _ras_affine(slices: list[_Slice]) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm: the first slice's plane, and the step from one
    slice to the next (the checked, evenly spaced ones)."""
    first = slices[0]
    step = (slices[-1].position - first.position) / (len(slices) - 1)
    between_rows, between_columns = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * between_columns  # the column index moves along a row
    lps[:3, 1] = first.orientation[3:] * between_rows
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps


def _nifti_header(affine: np.ndarray, data: np.ndarray, description: str) -> nib.Nifti1Header:
    """A fresh NIfTI header for the series' grid: masks written with it carry the exact affine
    (sform and qform, scanner coordinates) and the series description."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["descrip"] = description.encode("ascii", "replace")[:79]
    return header


def _listed(values: np.ndarray) -> str:
    return "\\".join(f"{value:g}" for value in values)


def _grid(one: _Slice) -> str:
    rows, columns = one.pixels.shape
    return f"{rows}×{columns} pixels of {_listed(one.pixel_spacing)} mm"
