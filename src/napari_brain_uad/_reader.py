"""napari reader: a NIfTI scan or a folder holding a DICOM series opens upright, with its voxel
spacing and its geometry attached.

A mask opened from disk is someone else's answer (an expert's lesion mask, a tumour
segmentation), not the model's nor the user's work in progress: it opens in the reference look
of ``_styles`` and, when napari names it after its file, with "(reference)" in its name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ._styles import BRAIN, REFERENCE, label_style, layer_name
from .dicom import holds_dicom, series_description
from .nifti import NiftiVolume, as_label_array, is_nifti_path, nifti_stem
from .scan_reader import read_scan


def get_reader(path: str | list[str]) -> Callable | None:
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(is_nifti_path(p) for p in paths):
        return read_layers
    if len(paths) == 1 and os.path.isdir(paths[0]) and holds_dicom(paths[0]):
        return read_layers
    return None


def read_layers(path: str | list[str]) -> list[tuple]:
    paths = [path] if isinstance(path, str) else list(path)
    return [layer_data(p) for p in paths]


def layer_data(path: str, *, name: str | None = None, labels: bool | None = None) -> tuple:
    """One napari LayerData tuple for a NIfTI file or a DICOM series folder.

    ``labels=None`` guesses: a scan holding only small non-negative integers (a lesion, tumour
    or brain mask) opens as Labels, anything else as an Image. A ``name`` given is kept as it is
    (the sample registry's names already say what a mask is).
    """
    volume = read_scan(path)
    display = volume.display_data()
    if labels is None:
        labels = volume.looks_like_labels()
    role = mask_role(path, name) if labels else None
    if not name:
        name = _layer_name(path, volume)
        if labels:
            name = layer_name(role, name)
    kwargs = {"name": name, **volume.geometry.layer_kwargs()}
    if labels:
        kwargs["metadata"]["role"] = role  # what the dock never takes for the user's own mask
        return as_label_array(display), {**kwargs, **label_style(role)}, "labels"
    kwargs["colormap"] = "gray"
    kwargs["contrast_limits"] = _contrast_limits(display)
    return display, kwargs, "image"


def mask_role(path: str, name: str | None = None) -> str:
    """A mask opened from disk is a brain mask when its file or layer name says so (drawn as
    an outline, as the dock's own brain layers are), else a reference segmentation."""
    text = f"{Path(path).name} {name or ''}".lower()
    return BRAIN if "brain" in text else REFERENCE


def _layer_name(path: str, volume: NiftiVolume) -> str:
    """A NIfTI file's stem; a DICOM series' description, or its folder's name when it has none."""
    if Path(path).is_dir():
        return series_description(volume) or Path(path).name
    return nifti_stem(path)


def _contrast_limits(display: np.ndarray) -> tuple[float, float]:
    """0.5th to 99.5th percentile of the non-zero voxels: bright outliers do not wash out the brain."""
    values = display[display != 0]
    if values.size == 0:
        values = display.ravel()
    low, high = np.percentile(values[:: max(1, values.size // 1_000_000)], [0.5, 99.5])
    if high <= low:
        low, high = float(display.min()), float(display.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)
