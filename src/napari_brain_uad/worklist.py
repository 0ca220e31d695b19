"""A worklist: the scans a user reviews one after the other, and their sessions saved on disk.

A worklist is a list of scans (a folder, a CSV file or a BIDS dataset, read by ``scan_list``)
and a session folder beside the outputs that holds, for each scan:

- ``<id>/results.npz``: the analysis (``analysis_cache``), tied to the scan's and the model's
  SHA256, so reopening a scan shows its results without running the network;
- ``<id>/review.npz``: the user's mask (their strokes and accepted findings) and the voxels
  they rejected, on the scan's own grid (one that can no longer be read is moved aside as
  ``review.damaged-<time>.npz``, never written over);

and ``worklist.json`` with each scan's status and choices (model, threshold, preset, minimum
size, median filter) and the scan last looked at. Every file is written atomically (a new
file beside the old, then renamed onto it): a crash in the middle of a save leaves the
previous session whole and readable.

A scan's status is one of: not run, run (results saved), reviewed (the user edited the mask or
decided on a finding since the last export), exported (its mask was written out since the last
edit), failed (its analysis stopped with an error, kept in the record). Qt-free: the widget's
worklist panel and any script use the same class.

Default session folders: ``<folder>/brain-uad-session`` for a folder of scans,
``<csv name>.brain-uad-session`` beside a CSV file, ``derivatives/napari-brain-uad`` in a
BIDS dataset (a BIDS-derivatives folder, with its ``dataset_description.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .analysis_cache import NPZ_READ_ERRORS, StaleResults, load_analysis, save_analysis, scan_sha256
from .errors import BrainUADError
from .nifti import NiftiVolume, write_atomically
from .scan_list import DEFAULT_BIDS_SUFFIX, ScanEntry, is_bids_dataset, read_scan_list, write_bids_description
from .scan_reader import read_scan

WORKLIST_FILE = "worklist.json"
WORKLIST_FORMAT = 1
NOT_RUN, RUN, REVIEWED, EXPORTED, FAILED = "not run", "run", "reviewed", "exported", "failed"
STATUSES = (NOT_RUN, RUN, REVIEWED, EXPORTED, FAILED)
BIDS_DERIVATIVE_NAME = "napari-brain-uad"


class WorklistError(BrainUADError):
    """The worklist's session folder cannot be used; the message says why."""


@dataclass
class ScanRecord:
    """What the worklist remembers of one scan, beside its results and review files."""

    status: str = NOT_RUN
    model: str | None = None  # the registry name or checkpoint file it was run with
    threshold: float | None = None
    min_size_ml: float | None = None
    preset: str | None = None
    median: bool | None = None
    review_sha256: str | None = None  # of the saved review: tells an edit since the last export
    error: str | None = None
    saved_at: str | None = None
    # The scan's own folder in the session folder, chosen once and kept: its id made safe as a
    # folder name, made unique when two ids give the same name ("scan 1" and "scan_1").
    folder: str | None = None


@dataclass
class RestoredScan:
    """A scan of the worklist as the user left it: its session and their mask (the scan's grid)."""

    entry: ScanEntry
    session: Any  # session.ScanSession (imported lazily: it brings the analysis)
    annotation: np.ndarray  # uint8, the scan's source grid


@dataclass
class Worklist:
    source: Path
    entries: list[ScanEntry]
    folder: Path
    records: dict[str, ScanRecord]
    current: str | None = None
    list_options: dict[str, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def open(cls, source: str | os.PathLike, *, folder: str | os.PathLike | None = None,
             bids_suffix: str = DEFAULT_BIDS_SUFFIX) -> "Worklist":
        """The worklist of ``source`` with its session folder (default: see the module's text):
        the saved statuses and choices of an earlier session come back; a scan new to the list
        starts as not run."""
        source = Path(os.path.abspath(source))
        entries = read_scan_list(source, bids_suffix=bids_suffix)
        folder = Path(os.path.abspath(folder)) if folder is not None else default_session_folder(source)
        records: dict[str, ScanRecord] = {}
        current = None
        saved = folder / WORKLIST_FILE
        if saved.is_file():
            try:
                content = json.loads(saved.read_text())
                if content.get("format") != WORKLIST_FORMAT:
                    raise ValueError(f"format {content.get('format')}, this version reads {WORKLIST_FORMAT}")
                known = {f for f in ScanRecord.__dataclass_fields__}
                records = {key: ScanRecord(**{k: v for k, v in value.items() if k in known})
                           for key, value in content["scans"].items()}
                current = content.get("current")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise WorklistError(f"{saved}: the saved worklist cannot be read ({error}); move it away to start "
                                    "a new session") from error
        for entry in entries:
            records.setdefault(entry.id, ScanRecord())
        _give_folders(records, [entry.id for entry in entries])
        worklist = cls(source, entries, folder, records, current if current in {e.id for e in entries} else None,
                       {"bids_suffix": bids_suffix})
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WorklistError(f"{folder}: cannot hold the session ({error}); choose another folder") from error
        if is_bids_dataset(source) and folder == default_session_folder(source):
            write_bids_description(folder, "napari-brain-uad review", {"Name": BIDS_DERIVATIVE_NAME})
        worklist.save()
        return worklist

    # ------------------------------------------------------------------ the list

    def entry(self, entry_id: str) -> ScanEntry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise KeyError(entry_id)

    def index(self, entry_id: str) -> int:
        return [entry.id for entry in self.entries].index(entry_id)

    def status(self, entry_id: str) -> str:
        return self.records[entry_id].status

    def next_to_run(self, after: str | None = None) -> ScanEntry | None:
        """The first scan after ``after`` (wrapping round) that was never run, or None."""
        start = 0 if after is None else self.index(after) + 1
        for offset in range(len(self.entries)):
            entry = self.entries[(start + offset) % len(self.entries)]
            if self.records[entry.id].status == NOT_RUN and entry.id != after:
                return entry
        return None

    def scan_folder(self, entry_id: str) -> Path:
        """Where a scan's session files go: its own folder, never another scan's."""
        return self.folder / self.records[entry_id].folder

    def results_path(self, entry_id: str) -> Path:
        return self.scan_folder(entry_id) / "results.npz"

    def review_path(self, entry_id: str) -> Path:
        return self.scan_folder(entry_id) / "review.npz"

    def has_results(self, entry_id: str) -> bool:
        return self.results_path(entry_id).is_file()

    # ------------------------------------------------------------------ saving

    def save(self) -> Path:
        """``worklist.json``, atomically."""
        with self._lock:
            content = {"format": WORKLIST_FORMAT, "source": str(self.source), "list_options": self.list_options,
                       "current": self.current, "scans": {key: asdict(value) for key, value in self.records.items()}}
            text = json.dumps(content, indent=1)
            return write_atomically(self.folder / WORKLIST_FILE, lambda temporary: Path(temporary).write_text(text),
                                    suffix=".json")

    def set_current(self, entry_id: str) -> None:
        with self._lock:
            self.current = entry_id
            self.save()

    def save_results(self, entry_id: str, analysis, *, model: str, model_sha256: str,
                     model_metadata: dict[str, Any], scan_hash: str | None = None) -> Path:
        """A run's analysis of scan ``entry_id``: written to its results file; the scan is run."""
        entry = self.entry(entry_id)
        scan_hash = scan_hash or scan_sha256(entry.scan)
        self.scan_folder(entry_id).mkdir(parents=True, exist_ok=True)
        path = save_analysis(analysis, self.results_path(entry_id), scan_sha256=scan_hash,
                             model_sha256=model_sha256, model_metadata=model_metadata)
        with self._lock:
            record = self.records[entry_id]
            record.model, record.error = model, None
            record.median = analysis.settings.median
            if record.status in (NOT_RUN, FAILED):
                record.status = RUN
            record.saved_at = _now()
            self.save()
        return path

    def save_failure(self, entry_id: str, message: str) -> None:
        with self._lock:
            record = self.records[entry_id]
            if record.status == NOT_RUN:
                record.status = FAILED
            record.error = message
            self.save()

    def save_review(self, entry_id: str, session, annotation: np.ndarray) -> bool:
        """The user's choices on scan ``entry_id``: threshold, preset, minimum size, median, the
        rejected voxels and their mask ``annotation`` (the scan's grid). Its status becomes
        reviewed when the mask or the decisions changed since the last save. Returns whether
        they had."""
        annotation = np.asarray(annotation, dtype=np.uint8)
        rejected = session.rejected if session.rejected is not None else np.zeros(annotation.shape, bool)
        digest = hashlib.sha256(annotation.tobytes() + np.packbits(rejected).tobytes()).hexdigest()
        self.scan_folder(entry_id).mkdir(parents=True, exist_ok=True)
        with self._lock:
            record = self.records[entry_id]
            changed = digest != record.review_sha256
            if changed:
                write_atomically(self.review_path(entry_id), lambda temporary: np.savez_compressed(
                    temporary, annotation=annotation, rejected=rejected), suffix=".npz")
                record.review_sha256 = digest
                anything = bool(annotation.any() or rejected.any())
                if anything or record.status == EXPORTED:
                    record.status = REVIEWED
            record.threshold, record.min_size_ml, record.preset = session.threshold, session.min_size_ml, session.preset
            record.median = session.analysis.filtered.median
            record.saved_at = _now()
            self.save()
        return changed

    def mark_exported(self, entry_id: str) -> None:
        """The scan's mask was written out: nothing of it is left unexported."""
        with self._lock:
            self.records[entry_id].status = EXPORTED
            self.save()

    # ------------------------------------------------------------------ reading back

    def saved_annotation(self, entry_id: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The user's saved mask of scan ``entry_id`` when it fits a grid of ``shape``, even when
        its results can no longer be used (the scan's file changed, the model did): a re-run must
        start from it, not from nothing. None when there is none or it does not fit."""
        if not self.review_path(entry_id).is_file():
            return None
        try:
            annotation, _ = self._read_review(entry_id)
        except StaleResults:  # damaged: moved aside, nothing to start from
            return None
        annotation = annotation.astype(np.uint8, copy=False)
        return annotation if annotation.shape == tuple(shape) and annotation.any() else None

    def _read_review(self, entry_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The saved mask and rejected voxels of scan ``entry_id`` (no code runs from the file).
        A review that cannot be read is moved out of the way under a name of its own, so the
        next save does not replace what may still be recovered from it, and is a
        :class:`StaleResults` saying where it went."""
        path = self.review_path(entry_id)
        try:
            with np.load(path, allow_pickle=False) as review:
                return review["annotation"], review["rejected"].astype(bool)
        except NPZ_READ_ERRORS as error:
            kept = path.with_name(f"review.damaged-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.npz")
            os.replace(path, kept)
            raise StaleResults(f"{path}: the saved review cannot be read ({type(error).__name__}: {error}); "
                               f"it is kept as {kept.name}. Run the scan again to review it anew") from error

    def restore(self, entry_id: str, *, model_sha256: str | None = None,
                scan: NiftiVolume | None = None) -> RestoredScan | None:
        """Scan ``entry_id`` as the user left it, from its saved results and review (the network
        does not run), or None when it has no results yet. ``model_sha256``: the hash of the
        model file the results were made with, as it is now (None when it is not here to check).
        Raises ``analysis_cache.StaleResults`` when the scan or the model changed since."""
        from .session import ScanSession

        if not self.has_results(entry_id):
            return None
        entry = self.entry(entry_id)
        scan = scan if scan is not None else read_scan(entry.scan)
        analysis, metadata = load_analysis(self.results_path(entry_id), scan, scan_sha256=scan_sha256(entry.scan),
                                           model_sha256=model_sha256)
        record = self.records[entry_id]
        if record.median is not None:
            analysis = analysis.with_median(record.median)
        session = ScanSession.start(analysis, metadata, min_size_ml=record.min_size_ml)
        if record.threshold is not None:
            session.threshold, session.preset = float(record.threshold), record.preset
        annotation = np.zeros(scan.data.shape, np.uint8)
        if self.review_path(entry_id).is_file():
            annotation, rejected = self._read_review(entry_id)
            if annotation.shape != scan.data.shape:
                raise StaleResults(f"{self.review_path(entry_id)}: saved for a grid of {annotation.shape}, "
                                   f"not this scan's {scan.data.shape}")
            session.rejected = rejected if rejected.any() else None
        return RestoredScan(entry, session, annotation)

    def run(self, entry_id: str, model_source: str, *, settings=None,
            progress: Callable[[float, str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> None:
        """Analyse scan ``entry_id`` from its files with the model ``model_source`` (a registry name
        or a checkpoint file) and save the results: what a background run of the next scan does.
        A failure the user can fix is recorded (status failed, with its message) and raised."""
        from .analysis import AnalysisSettings, analyse_scan
        from .downloads import file_sha256
        from .model_registry import resolve_model
        from .models import load_model

        entry = self.entry(entry_id)
        try:
            path = resolve_model(model_source)
            model, metadata = load_model(path)
            settings = settings or AnalysisSettings.for_model(metadata)
            scan = read_scan(entry.scan)
            brain = read_scan(entry.brain_mask, allow_empty=True) if entry.brain_mask else None
            analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings, progress=progress,
                                    cancelled=cancelled)
        except BrainUADError as error:
            self.save_failure(entry_id, str(error))
            raise
        self.save_results(entry_id, analysis, model=str(model_source), model_sha256=file_sha256(path),
                          model_metadata=metadata)


def safe_folder_name(entry_id: str) -> str:
    """A scan id as a folder name every file system takes (odd characters become "_")."""
    return re.sub(r"[^\w.-]+", "_", entry_id).strip("_.") or "scan"


def _give_folders(records: dict[str, ScanRecord], order: list[str]) -> None:
    """Give every record without a folder one that no other record has, in list order: the safe
    name of its id, or, when that is taken (another id gives the same safe name, compared
    without case for case-blind file systems), that name with its id's short hash."""
    taken = {record.folder.lower() for record in records.values() if record.folder}
    for entry_id in [*order, *sorted(set(records) - set(order))]:
        record = records[entry_id]
        if record.folder:
            continue
        name = safe_folder_name(entry_id)
        if name.lower() in taken:
            name = f"{name}-{hashlib.sha256(entry_id.encode()).hexdigest()[:8]}"
        record.folder = name
        taken.add(name.lower())


def default_session_folder(source: Path) -> Path:
    if source.is_file():
        return source.parent / f"{source.stem}.brain-uad-session"
    if is_bids_dataset(source):
        return source / "derivatives" / BIDS_DERIVATIVE_NAME
    return source / "brain-uad-session"


def model_file_sha256(model: str | None) -> str | None:
    """The SHA256 of the model file ``model`` names (a registry name or a checkpoint path) as it is
    on this machine now, or None when it is not here."""
    from .downloads import file_sha256
    from .model_registry import local_model_file, model_names

    if not model:
        return None
    path = local_model_file(model) if model in model_names() else Path(model)
    return file_sha256(path) if path is not None and Path(path).is_file() else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
