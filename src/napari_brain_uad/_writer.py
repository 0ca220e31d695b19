"""napari writers: Labels and Image layers go back to NIfTI on their source scan's grid.

napari's own Save dialog asks before replacing a file, so these writers replace an existing
file (atomically: the old file stays intact until the new one is complete).

Refusals are raised as :class:`LayerExportError`, a :class:`~napari_brain_uad.errors.BrainUADError`
but not a ``ValueError``: napari turns a writer's ``ValueError`` into a vague "not a valid
writer" warning, and the user must see why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BrainUADError
from .nifti import NiftiGeometry, ScanError, is_nifti_path, save_on_source_grid


class LayerExportError(BrainUADError):
    """A layer cannot be written as NIfTI; the message says why."""


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    return [str(write_layer(path, data, meta, kind="labels"))]


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    return [str(write_layer(path, data, meta, kind="image"))]


def geometry_of(meta: dict, layer_name: str = "") -> NiftiGeometry:
    """The NIfTI geometry a layer carries, or a clear error when it carries none."""
    geometry = (meta.get("metadata") or {}).get("nifti")
    if not isinstance(geometry, NiftiGeometry):
        raise LayerExportError(
            f"layer {layer_name!r} has no NIfTI geometry: it was not opened from a NIfTI file "
            "nor made from one. Draw labels on a layer created from an opened scan (or give the "
            "layer that scan's metadata) so the mask can be written with the scan's affine."
        )
    return geometry


def write_layer(path: str, data: Any, meta: dict, *, kind: str, overwrite: bool = True) -> Path:
    """Write one layer's data (with its napari ``meta``) on its scan's source grid."""
    name = meta.get("name", "")
    geometry = geometry_of(meta, name)
    if not is_nifti_path(path):
        path = f"{path}.nii.gz"
    if hasattr(data, "__array__") and tuple(data.shape) != tuple(geometry.display_shape):
        raise LayerExportError(
            f"layer {name!r} has shape {tuple(data.shape)} but its NIfTI geometry "
            f"({geometry.source}) needs {geometry.display_shape}; it cannot be written on that grid"
        )
    try:
        return save_on_source_grid(data, geometry, path, kind=kind, overwrite=overwrite)
    except ScanError as error:
        raise LayerExportError(str(error)) from None
