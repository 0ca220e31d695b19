"""A scan's analysis on disk: saved after a run, read back without running the network.

What is saved is everything the analysis computed up to the score, in model space (the scan
in model space with its transform and bias field, the mean reconstruction and the spread, the
score map) and the brain mask on the scan's grid. Reading it back redoes only the cheap,
deterministic rest (post-processing and the way back to the scan's grid) through the very
function a fresh run ends with (``analysis.analysis_from_model_space``), so a restored
analysis equals the saved one voxel for voxel.

Saved results belong to one scan and one model: the file records the SHA256 of both, and
reading refuses (:class:`StaleResults`) when the scan on disk is no longer the one analysed, or
when the model file it was made with has changed since. The model's card travels with the
results, so the thresholds and presets the session offers are the ones the run used.

The file is a NumPy ``.npz`` read with ``allow_pickle=False`` (no code runs when loading) and is
written atomically: a crash while saving leaves the previous file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import AnalysisSettings, ScanAnalysis, analysis_from_model_space
from .brain_mask import BrainMask
from .downloads import file_sha256
from .errors import BrainUADError
from .nifti import NiftiVolume, write_atomically
from .preprocess import ModelSpaceTransform, ModelSpaceVolume

CACHE_FORMAT = 1


# What reading a damaged or foreign .npz raises (a truncated or overwritten zip, a bad member,
# a missing or mis-shaped entry): each is the file's fault, never ours.
NPZ_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)


class StaleResults(BrainUADError):
    """Saved results no longer match the scan or the model (or cannot be read); run again."""


# Arrays named "model_map_<name>" hold the model kind's extra maps (SADM's segmentation, ...).
_MAP_PREFIX = "model_map_"


def scan_sha256(path: str | os.PathLike) -> str:
    """SHA256 of a scan as stored: a NIfTI file's bytes, or for a DICOM folder every file's
    name and bytes in name order (a file added, removed or changed changes it)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(file.name.encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def save_analysis(analysis: ScanAnalysis, path: str | os.PathLike, *, scan_sha256: str, model_sha256: str,
                  model_metadata: dict[str, Any]) -> Path:
    """Write ``analysis`` to ``path`` (``.npz``), atomically."""
    volume = analysis.model_space
    brain = analysis.brain or BrainMask(analysis.brain_mask)
    record = {
        "format": CACHE_FORMAT,
        "scan_sha256": scan_sha256,
        "model_sha256": model_sha256,
        "model_metadata": model_metadata,
        "settings": asdict(analysis.settings),
        "transform": asdict(volume.transform),
        "brain": {"source": brain.source, "volume_ml": brain.volume_ml, "method": brain.method},
        "model_voxel_ml": analysis.model_voxel_ml,
    }
    arrays = {
        "record": np.frombuffer(json.dumps(record).encode(), dtype=np.uint8),
        "image": volume.image,
        "model_brain_mask": volume.brain_mask,
        "brain_mask": brain.mask,
        "score": analysis.score_model_space,
        "reconstruction": analysis.reconstruction_model_space,
    }
    if volume.bias_field is not None:
        arrays["bias_field"] = volume.bias_field
    if analysis.spread_model_space is not None:
        arrays["spread"] = analysis.spread_model_space
    for name, values in analysis.model_maps_model_space.items():
        arrays[_MAP_PREFIX + name] = values
    return write_atomically(Path(path), lambda temporary: np.savez_compressed(temporary, **arrays), suffix=".npz")


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The saved results' record (hashes, settings, model card) without their arrays."""
    with _open(path) as saved:
        return _record(saved, path)


def load_analysis(path: str | os.PathLike, scan: NiftiVolume, *, scan_sha256: str,
                  model_sha256: str | None = None) -> tuple[ScanAnalysis, dict[str, Any]]:
    """The analysis saved at ``path`` for ``scan``, and the card of the model it was made with.

    ``scan_sha256`` is the scan's hash now; ``model_sha256`` the model file's now (None: the
    model file is not here to check, and the saved card stands for it). Raises
    :class:`StaleResults` when either differs from what was saved."""
    with _open(path) as saved:
        record = _record(saved, path)
        if record["scan_sha256"] != scan_sha256:
            raise StaleResults(f"{scan.path}: the scan changed since its results were saved; run it again")
        if model_sha256 is not None and record["model_sha256"] != model_sha256:
            raise StaleResults(f"{scan.path}: the model file changed since these results were made; run it again")
        arrays = {name: saved[name] for name in saved.files if name != "record"}
        transform_values = record["transform"]
        transform = ModelSpaceTransform(**{
            field.name: (tuple(_tuple(v) for v in value) if isinstance(value, list) else value)
            for field in fields(ModelSpaceTransform) for value in [transform_values[field.name]]
        })
        volume = ModelSpaceVolume(image=arrays["image"], brain_mask=arrays["model_brain_mask"].astype(bool),
                                  transform=transform, bias_field=arrays.get("bias_field"))
        brain_mask = arrays["brain_mask"].astype(bool)
        if brain_mask.shape != scan.data.shape:
            raise StaleResults(f"{path}: saved for a grid of {brain_mask.shape}, not this scan's {scan.data.shape}")
        brain = BrainMask(brain_mask, **record["brain"])
        settings_values = dict(record["settings"])
        if settings_values.get("noise_levels") is not None:
            settings_values["noise_levels"] = tuple(settings_values["noise_levels"])
        settings = AnalysisSettings(**settings_values)
        score_map, reconstruction, voxel_ml = arrays["score"], arrays["reconstruction"], float(record["model_voxel_ml"])
    # Outside the reading guard: a failure from here on is ours, not the file's.
    analysis = analysis_from_model_space(
        scan, volume, brain, settings, score_map=score_map, mean_reconstruction=reconstruction,
        spread=arrays.get("spread"), model_voxel_ml=voxel_ml,
        model_maps={name[len(_MAP_PREFIX):]: values for name, values in arrays.items() if name.startswith(_MAP_PREFIX)})
    return analysis, record["model_metadata"]


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


@contextmanager
def _open(path: str | os.PathLike):
    """The saved results, opened without running code; any damage found while reading them
    (members are read lazily, so also inside the ``with``) is a :class:`StaleResults`."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            yield saved
    except StaleResults:
        raise
    except NPZ_READ_ERRORS as error:
        raise StaleResults(f"{path}: the saved results cannot be read ({type(error).__name__}: {error}); "
                           "run the scan again") from error


def _record(saved, path) -> dict[str, Any]:
    try:
        record = json.loads(saved["record"].tobytes().decode())
    except (KeyError, ValueError) as error:
        raise StaleResults(f"{path}: not results saved by this plugin ({error})") from error
    if record.get("format") != CACHE_FORMAT:
        raise StaleResults(f"{path}: results saved in format {record.get('format')}, this version reads "
                           f"{CACHE_FORMAT}; run the scan again")
    return record
