"""Reading a scan as users have it: a NIfTI file, or a folder holding a DICOM series.

This is the one place that chooses between ``nifti`` and ``dicom``. It sits apart from both so
that the dependency runs one way: ``dicom`` builds on ``nifti``'s types, and neither imports the
other's reader. ``dicom`` (and with it SimpleITK) is imported only when a folder or a lone DICOM
file is given, so reading NIfTI scans never loads it. No Qt or napari import here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .nifti import NiftiVolume, ScanError, is_nifti_path, read_nifti


def read_scan(
    path: str | os.PathLike, *, allow_empty: bool = False, series_uid: str | None = None
) -> NiftiVolume:
    """Read a scan as users have it: a NIfTI file, or a folder holding a DICOM series.

    A folder goes to :func:`napari_brain_uad.dicom.read_dicom_series` (``series_uid`` picks a
    series when it holds several), anything else to :func:`read_nifti`; both raise
    :class:`ScanError` naming the path and the problem.
    """
    path = Path(path)
    if path.is_dir():
        from .dicom import read_dicom_series  # SimpleITK is loaded only for DICOM

        return read_dicom_series(path, series_uid, allow_empty=allow_empty)
    if series_uid is not None:
        raise ScanError(f"{path}: a DICOM series UID was given, but this is not a folder holding a DICOM series")
    if path.is_file() and not is_nifti_path(path):
        from .dicom import is_dicom_file

        if is_dicom_file(path):
            raise ScanError(f"{path}: is a single DICOM file; give the folder that holds its whole series")
    return read_nifti(path, allow_empty=allow_empty)
