"""Scoring a cohort: many scans, one output folder, a summary, resumable, in parallel.

``brain-uad score A.nii.gz B.nii.gz … --out-dir DIR`` (or a folder, a CSV file, a BIDS
dataset: ``scan_list``) comes here. This module owns:

- **Output names** (:func:`scan_outputs`). A scan with id ``ID`` writes into ``DIR``
  ``ID_anomaly_map.nii.gz``, ``ID_reconstruction.nii.gz``, ``ID_mask.nii.gz`` (when a
  threshold is known), ``ID_brain_mask.nii.gz`` and ``ID_brain-uad.json`` (its record). A scan
  of a BIDS dataset writes BIDS-derivative names into ``DIR/sub-XX/[ses-YY/]anat/``, from its
  entities without the suffix (``sub-01_ses-1_T1w`` gives ``sub-01_ses-1``):
  ``…_desc-anomaly_map.nii.gz``, ``…_desc-reconstruction_T1w.nii.gz`` (a pseudo-healthy
  T1w), ``…_desc-anomaly_mask.nii.gz``, ``…_desc-brain_mask.nii.gz`` and the record as the
  map's sidecar ``…_desc-anomaly_map.json``; ``DIR/dataset_description.json`` says what made
  them. ``DIR`` can then serve as the ``derivatives`` folder of a later run: its brain masks
  are found there.
- **The record and the skip rule** (:func:`_decide`). Beside each scan's outputs a JSON record
  holds the SHA256 of the scan, its brain mask and the model, and the settings that change the
  outputs. It is written first as unfinished, then (after every output) as finished; every
  file is written atomically. A re-run skips a scan whose finished record matches and whose
  outputs are all there; it redoes an unfinished one (an interrupted run); it refuses to
  replace outputs of another scan, model or settings, or files it did not write, unless
  ``overwrite``.
- **The summary** (:data:`SUMMARY_COLUMNS`): ``DIR/summary.csv`` and ``DIR/summary.json``, one
  row per scan (done, skipped or failed, with the error, and the model it was scored with), in
  the list's order.
- **A model per scan**: one :class:`CohortJob` for every scan, or one per scan (the command line
  picks each scan's model by its contrast when the user names none); each process loads each
  model once, when its first scan needs it.
- **Running**: in this process (the next scan is read while the network runs), in ``workers``
  processes that each load the model once, or sharded over the processes ``torchrun`` starts
  (``RANK``/``WORLD_SIZE``, Gloo): each rank writes ``summary.part-<rank>.csv`` and rank 0
  merges them once all are done.

One scan that cannot be read or analysed is a failed row; the others go on. No Qt import here.
"""

from __future__ import annotations

import csv
import io as text_io
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .analysis import AnalysisSettings
from .errors import BrainUADError, SettingsError, internal_error_message
from .io import write_atomically
from .scan_list import ScanEntry, bids_entities, write_bids_description
from .thresholds import ChosenThreshold

RECORD_FORMAT = 1
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
SUMMARY_CSV, SUMMARY_JSON = "summary.csv", "summary.json"
# One row per scan. The numbers are at the run's threshold (empty without one); ``typicality``
# is the scan's typicality score for the model (``typicality``; empty when the model stores none
# for these settings).
SUMMARY_COLUMNS = ("id", "scan", "status", "error", "seconds", "brain_ml", "flagged_ml", "findings",
                   "largest_finding_ml", "typicality", "model", "warnings")
_NUMBER_COLUMNS = {"seconds": float, "brain_ml": float, "flagged_ml": float, "findings": int,
                   "largest_finding_ml": float, "typicality": float}
# Settings that do not change the outputs (where the network runs, how many slices at once)
# do not make a finished scan stale.
_SETTINGS_NOT_RECORDED = ("device", "batch_size")
SOFTWARE = {"name": "napari-brain-uad", "version": __version__}


@dataclass(frozen=True, eq=False)
class CohortJob:
    """What every scan of a cohort is analysed with and where its outputs go (picklable, so
    worker processes get it whole)."""

    model_path: Path
    model_sha256: str
    model_metadata: dict = field(repr=False)
    settings: AnalysisSettings
    out_dir: Path
    threshold: ChosenThreshold | None = None
    min_size_ml: float | None = None
    overwrite: bool = False
    model_name: str = ""  # as the user named it, for the record

    def settings_record(self) -> dict:
        recorded = {key: value for key, value in asdict(self.settings).items() if key not in _SETTINGS_NOT_RECORDED}
        return {**recorded, "threshold": self.threshold.value if self.threshold else None,
                "threshold_name": self.threshold.name if self.threshold else None, "min_size_ml": self.min_size_ml}

    @property
    def shown_name(self) -> str:
        return self.model_name or str(self.model_path)

    def about(self) -> dict:
        """The run as the summary describes it."""
        return {"software": SOFTWARE, "model": self.shown_name,
                "model_file": str(self.model_path), "model_sha256": self.model_sha256, "settings": self.settings_record()}


def _about(jobs: Sequence[CohortJob]) -> dict:
    """A run with one model (one job) as :meth:`CohortJob.about` says it; with several, each one's."""
    if len(jobs) == 1:
        return jobs[0].about()
    return {"software": SOFTWARE, "models": [{key: value for key, value in job.about().items() if key != "software"}
                                             for job in jobs]}


# ------------------------------------------------------------------------------ output names

@dataclass(frozen=True)
class ScanOutputs:
    """Where one scan's outputs and record go."""

    files: dict[str, Path]  # "anomaly_map", "reconstruction", "mask" (with a threshold), "brain_mask"
    record: Path

    @property
    def folder(self) -> Path:
        return self.record.parent


def check_id(entry: ScanEntry) -> None:
    """Ids name files: refuse one that would name a file elsewhere."""
    if not entry.id or entry.id in (".", "..") or any(sep in entry.id for sep in ("/", "\\", "\0")):
        raise SettingsError(f"{entry.scan}: its id {entry.id!r} cannot name output files (no '/' or '\\'); "
                            "give another in the list's 'id' column")


def check_outputs_apart(entries: Sequence[ScanEntry], jobs: Sequence[CohortJob]) -> None:
    """Refuse, before any work, a cohort in which two scans would write the same file (one
    scan's outputs would replace the other's, and both would report done), or a scan's output
    would replace an input, or an output folder that is the scans' own (a second run read the
    maps written there as scans: "49 findings, 54 mL" in an anomaly map). Names are compared
    without case: a case-blind disk holds one of "A" and "a"."""
    inputs = {str(Path(path).resolve()).lower(): entry.id for entry in entries
              for path in (entry.scan, entry.brain_mask, entry.lesion_mask) if path is not None}
    written: dict[str, str] = {}
    for entry, job in zip(entries, jobs):
        if Path(os.path.abspath(entry.scan)).parent == Path(os.path.abspath(job.out_dir)):  # as named: links kept
            raise SettingsError(f"--out-dir {job.out_dir} holds the scans themselves ({entry.scan.name}): a later run "
                                "would read the maps written there as scans; choose a folder apart from the scans")
        outputs = scan_outputs(entry, job.out_dir, with_mask=True)
        for path in [*outputs.files.values(), outputs.record]:
            key = str(path.resolve()).lower()
            if key in written and written[key] != entry.id:
                raise SettingsError(f"scans {written[key]!r} and {entry.id!r} would both write {path.name}; give them "
                                    "ids that differ more (the list's 'id' column), or score them into different "
                                    "folders")
            if key in inputs:
                raise SettingsError(f"{path}: scoring {entry.id!r} would replace the input of {inputs[key]!r}; "
                                    "choose an output folder apart from the scans")
            written[key] = entry.id


def scan_outputs(entry: ScanEntry, out_dir: str | os.PathLike, *, with_mask: bool) -> ScanOutputs:
    """The output files of ``entry`` in ``out_dir`` (see the module's text for the names)."""
    out_dir = Path(out_dir)
    entities = dict(entry.entities)
    if "sub" in entities:
        folder = out_dir / f"sub-{entities['sub']}"
        if "ses" in entities:
            folder = folder / f"ses-{entities['ses']}"
        folder = folder / "anat"
        _, suffix = bids_entities(f"{entry.id}.nii.gz")
        base = "_".join(f"{key}-{value}" for key, value in entry.entities if key != "desc")
        files = {"anomaly_map": folder / f"{base}_desc-anomaly_map.nii.gz",
                 "reconstruction": folder / f"{base}_desc-reconstruction_{suffix}.nii.gz",
                 "mask": folder / f"{base}_desc-anomaly_mask.nii.gz",
                 "brain_mask": folder / f"{base}_desc-brain_mask.nii.gz"}
        record = folder / f"{base}_desc-anomaly_map.json"
    else:
        files = {kind: out_dir / f"{entry.id}_{kind}.nii.gz"
                 for kind in ("anomaly_map", "reconstruction", "mask", "brain_mask")}
        record = out_dir / f"{entry.id}_brain-uad.json"
    if not with_mask:
        del files["mask"]
    return ScanOutputs(files, record)


# ------------------------------------------------------------------------------ record and skip rule

def _fingerprint(job: CohortJob, scan_sha256: str, brain_sha256: str | None, outputs: ScanOutputs) -> dict:
    """What a finished scan's outputs depend on; a re-run with the same skips it."""
    fingerprint = {"scan_sha256": scan_sha256, "brain_mask_sha256": brain_sha256, "model_sha256": job.model_sha256,
                   "settings": job.settings_record(), "outputs": sorted(path.name for path in outputs.files.values())}
    return json.loads(json.dumps(fingerprint))  # as it reads back from JSON: tuples become lists


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _decide(record: dict | None, fingerprint: dict, outputs: ScanOutputs, overwrite: bool) -> tuple[str, str | None]:
    """("skip" | "run" | "refuse", why refused)."""
    if overwrite:
        return "run", None
    if record is not None and record.get("software", {}).get("name") == SOFTWARE["name"]:
        if not record.get("finished"):
            return "run", None  # an interrupted run of ours: its partial outputs are replaced
        if record.get("match") == fingerprint:
            present = all(path.is_file() for path in outputs.files.values())
            return ("skip", None) if present else ("run", None)
        stored = record.get("match") or {}
        changed = [what for key, what in (("scan_sha256", "scan"), ("brain_mask_sha256", "brain mask"),
                                          ("model_sha256", "model"), ("settings", "settings"), ("outputs", "outputs"))
                   if stored.get(key) != fingerprint[key]]
        return "refuse", (f"{outputs.record}: the {' and '.join(changed) or 'run'} changed since these outputs were "
                          "made; not replacing them (use --overwrite, or another --out-dir)")
    existing = [path for path in [*outputs.files.values(), outputs.record] if path.exists()]
    if existing:
        return "refuse", f"{existing[0]}: already exists and was not written by a cohort run; not overwriting it " \
                         "(use --overwrite)"
    return "run", None


def _write_record(outputs: ScanOutputs, document: dict) -> None:
    text = json.dumps(document, indent=2, default=float) + "\n"
    write_atomically(outputs.record, lambda temporary: Path(temporary).write_text(text), suffix=".json")


# ------------------------------------------------------------------------------ one scan

@dataclass(eq=False)
class _Prepared:
    """A scan read and checked, ready for the network (or a decision not to run it)."""

    entry: ScanEntry
    action: str = "run"  # "run", "skip", "refuse", or "error" (reading failed)
    message: str = ""
    outputs: ScanOutputs | None = None
    fingerprint: dict | None = None
    record: dict | None = None
    scan: Any = None
    brain: Any = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _prepare(entry: ScanEntry, job: CohortJob) -> _Prepared:
    """Hash the scan, read its record, and read the scan when it is to run. Only reads: safe in
    a reading-ahead thread."""
    from .analysis_cache import scan_sha256
    from .io import read_scan
    from .model_card import modality_mismatch
    from .model_registry import scan_contrast

    started = time.perf_counter()
    prepared = _Prepared(entry)
    with _collected_warnings() as messages:
        try:
            check_id(entry)
            prepared.outputs = scan_outputs(entry, job.out_dir, with_mask=job.threshold is not None)
            scan_hash = _sha256_of(entry.scan, scan_sha256)
            brain_hash = _sha256_of(entry.brain_mask, scan_sha256) if entry.brain_mask else None
            prepared.fingerprint = _fingerprint(job, scan_hash, brain_hash, prepared.outputs)
            prepared.record = read_record(prepared.outputs.record)
            prepared.action, refusal = _decide(prepared.record, prepared.fingerprint, prepared.outputs, job.overwrite)
            prepared.message = refusal or ""
            if prepared.action == "run":
                prepared.scan = read_scan(entry.scan)
                prepared.brain = read_scan(entry.brain_mask, allow_empty=True) if entry.brain_mask else None
                mismatch = modality_mismatch(job.model_metadata, scan_contrast(entry.scan, entry.id))
                if mismatch:
                    warnings.warn(f"{entry.scan}: {mismatch}")
        except BrainUADError as error:
            prepared.action, prepared.message = "error", str(error)
        except Exception as error:  # a bug: logged with its traceback, the other scans go on
            prepared.action, prepared.message = "error", internal_error_message(error, f"cohort scan {entry.id}")
    prepared.warnings = messages
    prepared.seconds = time.perf_counter() - started
    return prepared


def _sha256_of(path: Path, digest: Callable[[Path], str]) -> str:
    from .io import ScanError

    try:
        return digest(path)
    except OSError as error:
        raise ScanError(f"{path}: cannot be read ({error.strerror or error})") from error


def _score_prepared(prepared: _Prepared, job: CohortJob, model) -> dict:
    """Analyse a prepared scan and write its outputs, then its record; the summary row."""
    entry = prepared.entry
    if prepared.action in ("error", "refuse"):
        return summary_row(entry, FAILED, error=prepared.message, seconds=prepared.seconds, warnings=prepared.warnings,
                           model=job.shown_name)
    if prepared.action == "skip":
        return summary_row(entry, SKIPPED, seconds=prepared.seconds, result=prepared.record.get("result"),
                           warnings=prepared.warnings, model=job.shown_name)
    started = time.perf_counter()
    with _collected_warnings() as messages:
        try:
            result = _analyse_and_write(prepared, job, model)
            status, error = DONE, ""
        except BrainUADError as failure:
            status, error, result = FAILED, str(failure), None
        except Exception as failure:  # a bug: logged with its traceback, the other scans go on
            status, error, result = FAILED, internal_error_message(failure, f"cohort scan {entry.id}"), None
    return summary_row(entry, status, error=error, seconds=prepared.seconds + time.perf_counter() - started,
                       result=result, warnings=[*prepared.warnings, *messages], model=job.shown_name)


def _analyse_and_write(prepared: _Prepared, job: CohortJob, model) -> dict:
    from .analysis import analyse_scan
    from .io import save_source_array
    from .typicality import assess

    entry, outputs = prepared.entry, prepared.outputs
    started = time.perf_counter()
    record = {"format": RECORD_FORMAT, "software": SOFTWARE, "finished": False, "id": entry.id,
              "scan": str(entry.scan), "brain_mask": str(entry.brain_mask) if entry.brain_mask else None,
              "model": job.shown_name, "match": prepared.fingerprint,
              "outputs": {kind: path.name for kind, path in outputs.files.items()}}
    # First an unfinished record: should this run stop half-way, the next one knows the partial
    # outputs are its own to replace.
    _write_record(outputs, record)
    analysis = analyse_scan(prepared.scan, model, brain_mask=prepared.brain, settings=job.settings)
    geometry = prepared.scan.geometry
    save_source_array(analysis.anomaly_map, geometry, outputs.files["anomaly_map"], kind="image", overwrite=True)
    save_source_array(analysis.reconstruction, geometry, outputs.files["reconstruction"], kind="image", overwrite=True)
    save_source_array(analysis.brain.mask.astype("uint8"), geometry, outputs.files["brain_mask"], kind="labels",
                      overwrite=True)
    result: dict[str, Any] = {"brain_ml": round(float(analysis.brain.volume_ml), 3)}
    typical = assess(analysis, job.model_metadata)
    if typical is not None:
        result["typicality"] = round(typical.score, 2)
        if typical.atypical:
            warnings.warn(f"{entry.scan}: {typical.describe()}")
    if job.threshold is not None:
        mask = analysis.mask_at(job.threshold.value, job.min_size_ml)
        save_source_array(mask, geometry, outputs.files["mask"], kind="labels", overwrite=True)
        findings = analysis.findings(job.threshold.value, job.min_size_ml)
        volumes = [float(finding["volume_ml"]) for finding in findings]
        result.update(flagged_ml=round(sum(volumes), 3), findings=len(volumes),
                      largest_finding_ml=round(max(volumes, default=0.0), 3))
    # Last, the finished record: only now is the scan done for a later run.
    _write_record(outputs, {**record, "finished": True, "brain": analysis.brain.describe(), "result": result,
                            "seconds": round(prepared.seconds + time.perf_counter() - started, 2),
                            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result


def summary_row(entry: ScanEntry, status: str, *, error: str = "", seconds: float = 0.0,
                result: dict | None = None, warnings: Sequence[str] = (), model: str = "") -> dict:
    result = result or {}
    return {"id": entry.id, "scan": str(entry.scan), "status": status, "error": error,
            "seconds": round(float(seconds), 2), "brain_ml": result.get("brain_ml"),
            "flagged_ml": result.get("flagged_ml"), "findings": result.get("findings"),
            "largest_finding_ml": result.get("largest_finding_ml"), "typicality": result.get("typicality"),
            "model": model, "warnings": "; ".join(dict.fromkeys(warnings))}


# ------------------------------------------------------------------------------ warnings per scan

_current = threading.local()


@contextmanager
def _collected_warnings():
    """The warnings raised in this thread meanwhile go into the yielded list (they end up in
    the scan's summary row) instead of the terminal."""
    messages: list[str] = []
    previous = getattr(_current, "messages", None)
    _current.messages = messages
    try:
        yield messages
    finally:
        _current.messages = previous


@contextmanager
def _routing_warnings():
    """For a whole run: every warning is shown (not once per place), to the scan it is about."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            collected = getattr(_current, "messages", None)
            if collected is None:
                shown(message, category, filename, lineno, file, line)
            else:
                collected.append(str(message))

        warnings.showwarning = show
        yield


# ------------------------------------------------------------------------------ running

@dataclass(frozen=True)
class Processes:
    """This process's place among the ones ``torchrun`` started (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_environment(cls) -> "Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class CohortSummary:
    """The rows of a run (every rank's on rank 0; its own shard's elsewhere) and the counts."""

    rows: list[dict]
    out_dir: Path
    total_failed: int = 0

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


def score_cohort(entries: Sequence[ScanEntry], job: CohortJob | Sequence[CohortJob], *, workers: int = 1,
                 threads: int | None = None, report: Callable[[int, int, dict], None] | None = None) -> CohortSummary:
    """Score every entry (this rank's share when started by torchrun) and write the summary.
    ``job``: one for every entry, or one per entry (all with the same output folder)."""
    if workers < 1:
        raise SettingsError(f"--workers must be at least 1, not {workers}")
    jobs = [job] * len(entries) if isinstance(job, CohortJob) else list(job)
    if len(jobs) != len(entries):
        raise ValueError(f"{len(jobs)} cohort jobs for {len(entries)} scans")
    used = list(dict.fromkeys([job] if isinstance(job, CohortJob) else jobs))
    if not used:
        raise SettingsError("no scans to score")
    out_dir = used[0].out_dir
    if any(one.out_dir != out_dir for one in used):
        raise ValueError("every scan of a cohort writes into one output folder")
    for entry in entries:
        check_id(entry)
    check_outputs_apart(entries, jobs)
    processes = Processes.from_environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    if processes.rank == 0 and any(dict(entry.entities).get("sub") for entry in entries):
        description = "; ".join(f"model {one.model_name or one.model_path.name}, scorer {one.settings.scorer}"
                                for one in used)
        write_bids_description(out_dir, "napari-brain-uad anomaly maps",
                               {"Name": SOFTWARE["name"], "Version": __version__, "Description": description})
    shard = list(zip(entries, jobs))[processes.rank::processes.world_size]
    if threads is None and (workers > 1 or processes.distributed):
        threads = max(1, _cores() // (workers * processes.local_world_size))
    if processes.distributed:
        _join_process_group(processes)
    # One run writes into a folder at a time (two runs with other settings both reported done,
    # and only the second one's masks remained); torchrun's ranks are one run, rank 0 holds it.
    with _output_folder_lock(out_dir) if processes.rank == 0 else nullcontext():
        with _routing_warnings():
            if workers == 1:
                rows = _score_here(shard, threads, report)
            else:
                rows = _score_in_workers(shard, workers, threads, report)
        if not processes.distributed:
            write_summary(out_dir, rows, _about(used))
            return CohortSummary(rows, out_dir, sum(row["status"] == FAILED for row in rows))
        return _merge_ranks(processes, entries, rows, out_dir, _about(used))


LOCK_FILE = ".brain-uad-running"


@contextmanager
def _output_folder_lock(out_dir: Path):
    """Hold ``out_dir`` for this run: a lock file naming this process, created exclusively; one
    left by a process that no longer runs (a crash, kill -9) is taken over. Refuses while
    another run holds it."""
    lock = out_dir / LOCK_FILE
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _process_runs(holder):
                raise SettingsError(f"{out_dir}: another brain-uad run (process {holder}) is writing there; wait for "
                                    "it, or choose another --out-dir") from None
            lock.unlink(missing_ok=True)  # left by a run that ended without cleaning up
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise SettingsError(f"{out_dir}: cannot take the folder's lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _score_here(shard: Sequence[tuple[ScanEntry, CohortJob]], threads: int | None, report) -> list[dict]:
    """One scan after another in this process; the next scan is read while the network runs."""
    if threads is not None:  # else torch's own choice, as for a single scan (the same maps, bit for bit)
        _limit_threads(threads)
    models: dict[Path, Any] = {}
    rows = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
        upcoming = reader.submit(_prepare, *shard[0]) if shard else None
        for index, (entry, job) in enumerate(shard):
            prepared = upcoming.result()
            upcoming = reader.submit(_prepare, *shard[index + 1]) if index + 1 < len(shard) else None
            if prepared.action == "run" and job.model_path not in models:
                models[job.model_path] = _load(job)
            row = _score_prepared(prepared, job, models.get(job.model_path))
            rows.append(row)
            if report is not None:
                report(index, len(shard), row)
    return rows


def _score_in_workers(shard: Sequence[tuple[ScanEntry, CohortJob]], workers: int, threads: int,
                      report) -> list[dict]:
    """``workers`` processes, each loading each model once, take the scans as they come free."""
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    jobs = list(dict.fromkeys(job for _, job in shard))
    rows: list[dict | None] = [None] * len(shard)
    # spawn, not fork: a forked copy of a process that already runs torch's threads can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, max(len(shard), 1)), mp_context=context,
                             initializer=_start_worker, initargs=(jobs, threads)) as pool:
        futures = {pool.submit(_score_in_worker, entry, jobs.index(job)): index
                   for index, (entry, job) in enumerate(shard)}
        for done, future in enumerate(as_completed(futures)):
            index = futures[future]
            entry, job = shard[index]
            try:
                row = future.result()
            except BrokenProcessPool as error:
                row = summary_row(entry, FAILED, error=f"the worker process stopped ({error})", model=job.shown_name)
            except Exception as error:
                row = summary_row(entry, FAILED, error=internal_error_message(error, "cohort worker"),
                                  model=job.shown_name)
            rows[index] = row
            if report is not None:
                report(done, len(shard), row)
    return rows


_worker: dict[str, Any] = {}


def _start_worker(jobs: list[CohortJob], threads: int | None) -> None:
    if threads is not None:
        _limit_threads(threads)
    _worker["jobs"], _worker["models"] = jobs, {}


def _score_in_worker(entry: ScanEntry, job_index: int) -> dict:
    job, models = _worker["jobs"][job_index], _worker["models"]
    with _routing_warnings():
        prepared = _prepare(entry, job)
        if prepared.action == "run" and job_index not in models:
            models[job_index] = _load(job)  # once per worker and model, on its first scan to run
        return _score_prepared(prepared, job, models.get(job_index))


def _load(job: CohortJob):
    from .models import load_model

    return load_model(job.model_path)[0]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _limit_threads(threads: int) -> None:
    """Processes sharing a machine share its cores: torch's and ITK's (N4) thread pools."""
    import torch

    torch.set_num_threads(threads)
    try:
        import SimpleITK

        SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass


# ------------------------------------------------------------------------------ torchrun

def _join_process_group(processes: Processes) -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():  # each rank on its own GPU of the machine ("auto" and "cuda" mean that one)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        # Gloo whatever the device: the ranks only wait for each other and add up counts. The
        # ranks finish their shards at different times; the wait may be long.
        dist.init_process_group(backend="gloo", timeout=timedelta(days=7))


def _merge_ranks(processes: Processes, entries: Sequence[ScanEntry], rows: list[dict], out_dir: Path,
                 about: dict) -> CohortSummary:
    """Each rank writes its part; once all have, rank 0 merges them into the summary."""
    import torch
    import torch.distributed as dist

    write_atomically(part_path(out_dir, processes.rank),
                     lambda temporary: Path(temporary).write_text(_csv_text(rows)), suffix=".csv")
    failed = torch.tensor([sum(row["status"] == FAILED for row in rows)], dtype=torch.int64)
    dist.all_reduce(failed)  # also waits for every rank to have written its part
    summary = CohortSummary(rows, out_dir, int(failed.item()))
    if processes.rank == 0:
        merged = []
        for rank in range(processes.world_size):
            merged.extend(read_summary_csv(part_path(out_dir, rank)))
        order = {entry.id: index for index, entry in enumerate(entries)}
        merged.sort(key=lambda row: order.get(row["id"], len(order)))
        write_summary(out_dir, merged, about)
        for part in Path(out_dir).glob("summary.part-*.csv"):  # also those of a stopped run with more ranks
            part.unlink(missing_ok=True)
        summary.rows = merged
    dist.barrier()  # no rank leaves (and torchrun stops none) before the summary is whole
    dist.destroy_process_group()
    return summary


def part_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"summary.part-{rank}.csv"


# ------------------------------------------------------------------------------ the summary

def _csv_text(rows: Sequence[dict]) -> str:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in SUMMARY_COLUMNS})
    return buffer.getvalue()


def read_summary_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a summary (or part) CSV with their numbers as numbers and empty cells as None."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if value == "":
                row[key] = None if key in _NUMBER_COLUMNS else ""
            elif key in _NUMBER_COLUMNS:
                row[key] = _NUMBER_COLUMNS[key](float(value))
    return rows


def write_summary(out_dir: Path, rows: Sequence[dict], about: dict) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json`` (the run's model and settings, counts, rows)."""
    counts = {status: sum(row["status"] == status for row in rows) for status in (DONE, SKIPPED, FAILED)}
    document = {**about, "counts": counts, "columns": list(SUMMARY_COLUMNS), "scans": list(rows),
                "note": "flagged_ml, findings and largest_finding_ml at the threshold in settings, on each scan's "
                        "own grid; typicality: how unlike the model's healthy calibration scans the scan is (a robust "
                        "z-score; above the model's limit its findings are unreliable)"}
    csv_path = write_atomically(Path(out_dir) / SUMMARY_CSV,
                                lambda temporary: Path(temporary).write_text(_csv_text(rows)), suffix=".csv")
    text = json.dumps(document, indent=2, default=float) + "\n"
    json_path = write_atomically(Path(out_dir) / SUMMARY_JSON, lambda temporary: Path(temporary).write_text(text),
                                 suffix=".json")
    return csv_path, json_path


def progress_line(index: int, count: int, row: dict, rank: Processes | None = None) -> str:
    """One line per scan for the terminal."""
    where = f"rank {rank.rank}: " if rank is not None and rank.distributed else ""
    text = f"{where}[{index + 1}/{count}] {row['id']}: {row['status']}"
    if row["status"] == FAILED:
        return f"{text}: {row['error']}"
    if row.get("findings") is not None:
        text += f", {row['findings']} finding(s), {row['flagged_ml']:.2f} mL"
    return f"{text} ({row['seconds']:.1f} s)"


# ------------------------------------------------------------------------------ evaluation

def labelled_cases(entries: Sequence[ScanEntry]):
    """The evaluation cases of a list: each scan with its lesion mask (and brain mask)."""
    from .evaluation import LabelledCase

    missing = [entry.id for entry in entries if entry.lesion_mask is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SettingsError(f"{len(missing)} of {len(entries)} scans have no lesion mask to evaluate against "
                            f"({shown}): give a 'lesion_mask' column, or *_label-lesion_mask files in the BIDS "
                            "derivatives")
    return [LabelledCase(entry.scan, entry.lesion_mask, entry.brain_mask, name=entry.id) for entry in entries]


def print_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
