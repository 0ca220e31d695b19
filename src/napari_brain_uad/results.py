"""A scan's result files: their names, what each holds, how they are written, and the lines that
sum a result up. Every door writes through here: the widget's export, ``brain-uad score`` (one
scan, the paths the user named) and the cohort (``brain-uad score … --out-dir``).

- **Kinds** (:data:`IMAGE_KINDS`, :data:`LABEL_KINDS`): ``anomaly_map``, ``reconstruction``
  (pseudo-healthy), ``spread`` (std over the N reconstructions, N > 1 only), a model's extra maps
  by their own names (``analysis.model_maps``: PHANES' ``perceptual``, SADM's ``segmentation``),
  and the labels ``mask`` (the findings at a threshold) and ``brain_mask``. :func:`array_of` says
  what array each holds; every file is on the scan's own grid with its affine.
- **Names** (:func:`named_outputs`): a scan named ``ID`` writes ``ID_<kind>.nii.gz``; a scan
  of a BIDS dataset writes BIDS-derivative names into ``sub-XX/[ses-YY/]anat/`` from its entities
  without the suffix: ``…_desc-anomaly_map.nii.gz``, ``…_desc-reconstruction_<suffix>.nii.gz``,
  ``…_desc-anomaly_mask.nii.gz``, ``…_desc-brain_mask.nii.gz``, ``…_desc-<name>_map.nii.gz`` for
  the spread and extra maps, and a record as the map's sidecar ``…_desc-anomaly_map.json``.
- **Writing** (:func:`write_results`, :func:`write_json`): each file to a temporary name beside
  it, renamed when complete; an existing file is replaced only when asked.
- **Checks before the analysis** (:func:`check_outputs`): outputs that are one file, an output
  that is an input, an output folder that cannot be written — each refused with a message naming
  the file or folder, before minutes of work, instead of failing at the end.
- **The numbers and lines** (:class:`ScanResult`): brain volume, typicality, findings at the
  threshold; the typicality warning and the one-line summary every door shows.

No Qt import here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputExists, SettingsError
from .nifti import is_nifti_path, save_source_array, scan_stem, write_atomically

IMAGE_KINDS = ("anomaly_map", "reconstruction", "spread")  # and a model's extra maps, by their names
LABEL_KINDS = ("mask", "brain_mask")
# A cohort writes these (the mask only with a threshold); its skip rule and its check that no
# two scans write one file know them before the analysis. The spread and extra maps follow.
COHORT_KINDS = ("anomaly_map", "reconstruction", "mask", "brain_mask")
# BIDS-derivative names of the fixed kinds: desc-<what>_<suffix>. The reconstruction is a
# pseudo-healthy image of the scan's own suffix (T1w, FLAIR…), filled in by named_outputs.
_BIDS_NAMES = {"anomaly_map": "desc-anomaly_map", "reconstruction": "desc-reconstruction_{suffix}",
               "mask": "desc-anomaly_mask", "brain_mask": "desc-brain_mask"}
RECORD_SUFFIX, BIDS_RECORD = "_brain-uad.json", "_desc-anomaly_map.json"


# ------------------------------------------------------------------------------ names

@dataclass(frozen=True)
class ScanOutputs:
    """Where one scan's result files go (by kind) and, for a cohort, its record."""

    files: dict[str, Path]
    record: Path | None = None

    @property
    def folder(self) -> Path:
        return (self.record or next(iter(self.files.values()))).parent


def named_outputs(folder: str | os.PathLike, name: str, kinds: Iterable[str], *,
                  entities: Sequence[tuple[str, str]] = (), suffix: str = "") -> ScanOutputs:
    """The files of ``kinds`` for a scan called ``name`` in ``folder`` (see the module's text);
    with BIDS ``entities`` (``sub`` among them) the BIDS-derivative names, ``suffix`` being the
    scan's (``T1w``)."""
    folder = Path(folder)
    found = dict(entities)
    if "sub" not in found:
        return ScanOutputs({kind: folder / f"{name}_{kind}.nii.gz" for kind in kinds}, folder / f"{name}{RECORD_SUFFIX}")
    folder = folder / f"sub-{found['sub']}"
    if "ses" in found:
        folder = folder / f"ses-{found['ses']}"
    folder = folder / "anat"
    base = "_".join(f"{key}-{value}" for key, value in entities if key != "desc")
    files = {}
    for kind in kinds:
        # BIDS labels are alphanumeric: "spread" → desc-spread_map, an extra map likewise.
        pattern = _BIDS_NAMES.get(kind) or f"desc-{re.sub(r'[^A-Za-z0-9]', '', kind)}_map"
        files[kind] = folder / f"{base}_{pattern.format(suffix=suffix)}.nii.gz"
    return ScanOutputs(files, folder / f"{base}{BIDS_RECORD}")


def image_kinds(analysis) -> list[str]:
    """The maps an analysis holds: the anomaly map, the reconstruction, the spread (N > 1) and
    the model's extra maps."""
    kinds = ["anomaly_map", "reconstruction"] + (["spread"] if analysis.spread is not None else [])
    return kinds + [name for name in analysis.model_maps if name not in kinds]


def export_outputs(analysis, folder: str | os.PathLike) -> ScanOutputs:
    """The widget's export of an analysis's maps into ``folder``, named after the scan's file."""
    return named_outputs(folder, scan_stem(analysis.scan.path), image_kinds(analysis))


# ------------------------------------------------------------------------------ what is written

def array_of(analysis, kind: str, *, threshold: float | None = None, min_size_ml: float | None = None):
    """(array on the scan's grid, "image" or "labels") for ``kind``; None for a spread of one
    reconstruction."""
    if kind == "mask":
        if threshold is None:
            raise SettingsError("a mask needs a threshold")
        return analysis.mask_at(threshold, min_size_ml), "labels"
    if kind == "brain_mask":
        return analysis.brain.mask.astype(np.uint8), "labels"
    if kind == "spread":
        return (None if analysis.spread is None else (analysis.spread, "image"))
    arrays = {"anomaly_map": analysis.anomaly_map, "reconstruction": analysis.reconstruction, **analysis.model_maps}
    if kind not in arrays:
        raise ValueError(f"no output kind {kind!r}")
    return arrays[kind], "image"


def write_results(analysis, files: Mapping[str, Path], *, threshold: float | None = None,
                  min_size_ml: float | None = None, overwrite: bool = False) -> list[Path]:
    """Write each kind of ``files`` from ``analysis`` (each file atomically); the files written.
    A spread of one reconstruction is left out."""
    written = []
    for kind, path in files.items():
        made = array_of(analysis, kind, threshold=threshold, min_size_ml=min_size_ml)
        if made is not None:
            array, how = made
            written.append(save_source_array(array, analysis.scan.geometry, path, kind=how, overwrite=overwrite))
    return written


def write_json(path: str | os.PathLike, document: Any) -> Path:
    """A JSON document (a record, a summary), written atomically."""
    text = json.dumps(document, indent=2, default=float) + "\n"
    return write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"),
                            suffix=".json")


# ------------------------------------------------------------------------------ checks before the analysis

def same_file_key(path: str | os.PathLike) -> str:
    """What two names of one file share: the resolved path without case (a case-blind disk
    holds one of "A" and "a")."""
    return str(Path(path).resolve()).lower()


def check_outputs(files: Mapping[str, str | os.PathLike], *, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False) -> None:
    """Before any work: every output a NIfTI name, no two outputs one file, no output an input
    (not even with ``overwrite``: the scan would be lost), none already there unless
    ``overwrite``, and each output's folder writable."""
    seen: dict[str, str] = {}
    given = {same_file_key(path): Path(path) for path in inputs if path is not None}
    for kind, path in files.items():
        if not is_nifti_path(path):
            raise SettingsError(f"{path}: output names must end in .nii.gz or .nii")
        key = same_file_key(path)
        if key in seen:
            raise SettingsError(f"{path}: given for both the {_shown(seen[key])} and the {_shown(kind)}; give each "
                                "output its own file")
        if key in given:
            raise SettingsError(f"{path}: the {_shown(kind)} would replace the input {given[key]}; write it elsewhere")
        seen[key] = kind
    for path in files.values():
        if Path(path).exists() and not overwrite:
            raise OutputExists(f"{path}: already exists; not overwriting it")
    for folder in dict.fromkeys(Path(path).parent for path in files.values()):
        check_folder_writable(folder)


def _shown(kind: str) -> str:
    return kind.replace("_", " ")


def check_folder_writable(folder: str | os.PathLike) -> None:
    """Refuse, as the user's to fix, an output folder this process cannot write into (or make):
    found by writing and removing a file there (or in the nearest folder that exists), which
    also answers for read-only disks and access lists that permission bits do not show."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"{folder}: cannot be an output folder: {existing} is a file")
    try:
        handle, probe = tempfile.mkstemp(prefix=".brain-uad-write-test.", dir=existing)
    except OSError as error:
        where = "" if existing == folder else f" (nor can {existing} hold it)"
        raise SettingsError(f"{folder}: cannot write into this folder{where}: {error.strerror or error}; choose "
                            "another output folder, or make it writable") from None
    os.close(handle)
    os.unlink(probe)


# ------------------------------------------------------------------------------ the numbers and lines

@dataclass(frozen=True)
class ScanResult:
    """What a scan's analysis says, for the terminal, the status bar, a record or a summary row."""

    brain_ml: float
    brain: str  # how the brain mask was found, and its volume
    typicality: Any = None  # typicality.Typicality, when the model stores the healthy statistics
    finding_ml: tuple[float, ...] | None = None  # each finding's volume, largest first; None without a threshold
    threshold: str = ""  # the threshold, as the findings were counted at

    @classmethod
    def of(cls, analysis, metadata: Mapping[str, Any], threshold=None,
           min_size_ml: float | None = None) -> "ScanResult":
        """``threshold``: a ``thresholds.ChosenThreshold``, or None (no findings counted)."""
        from .typicality import assess

        volumes = None
        if threshold is not None:
            volumes = tuple(float(finding["volume_ml"]) for finding in analysis.findings(threshold.value, min_size_ml))
        return cls(float(analysis.brain.volume_ml), analysis.brain.describe(), assess(analysis, metadata), volumes,
                   threshold.describe() if threshold is not None else "")

    @property
    def atypical(self) -> bool:
        return self.typicality is not None and self.typicality.atypical

    def numbers(self) -> dict[str, Any]:
        """The record's and the summary row's numbers (``cohort_records.SUMMARY_COLUMNS``)."""
        numbers: dict[str, Any] = {"brain_ml": round(self.brain_ml, 3)}
        if self.typicality is not None:
            numbers["typicality"] = round(self.typicality.score, 2)
        if self.finding_ml is not None:
            numbers.update(flagged_ml=round(sum(self.finding_ml), 3), findings=len(self.finding_ml),
                           largest_finding_ml=round(max(self.finding_ml, default=0.0), 3))
        return numbers

    def warning(self, scan: str | os.PathLike) -> str | None:
        """The warning every door gives for an atypical scan: its findings are unreliable."""
        return f"{scan}: {self.typicality.describe()}" if self.atypical else None

    def findings_line(self) -> str | None:
        if self.finding_ml is None:
            return None
        return f"{len(self.finding_ml)} finding(s), {sum(self.finding_ml):.2f} mL in all at threshold {self.threshold}"

    def lines(self) -> list[str]:
        """For the terminal, one fact a line: the brain, the typicality (unless atypical: that
        is :meth:`warning`'s) and the findings."""
        typical = [self.typicality.describe()] if self.typicality is not None and not self.atypical else []
        return [self.brain, *typical, *filter(None, [self.findings_line()])]

    def summary_line(self, findings: int | None = None) -> str:
        """One line for a status bar: the findings (``findings`` counts them when the user's
        review already decided some), the brain, the typicality."""
        count = findings if findings is not None else (len(self.finding_ml) if self.finding_ml is not None else None)
        parts = ([f"{count} finding(s)"] if count is not None else []) + [self.brain]
        if self.typicality is not None:
            parts.append(self.typicality.describe())
        return "; ".join(parts)
