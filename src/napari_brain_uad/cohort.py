"""Scoring a cohort: many scans, one output folder, a summary, resumable, in parallel.

``brain-uad score A.nii.gz B.nii.gz … --out-dir DIR`` (or a folder, a CSV file, a BIDS
dataset: ``scan_list``) comes here. This module runs the scans; ``results`` names and writes
each scan's files (the same as the widget's export and a single ``score``), and
``cohort_records`` keeps the records, the skip rule and the summary.

- **Outputs**: a scan with id ``ID`` writes into ``DIR`` ``ID_anomaly_map.nii.gz``,
  ``ID_reconstruction.nii.gz``, ``ID_mask.nii.gz`` (when a threshold is known),
  ``ID_brain_mask.nii.gz``, ``ID_spread.nii.gz`` (N > 1) and the model's extra maps
  (``ID_<name>.nii.gz``), and ``ID_brain-uad.json`` (its record). A scan of a BIDS dataset writes
  BIDS-derivative names into ``DIR/sub-XX/[ses-YY/]anat/`` (``results``);
  ``DIR/dataset_description.json`` says what made them. ``DIR`` can then serve as the
  ``derivatives`` folder of a later run: its brain masks are found there.
- **Before any analysis** the run refuses what it cannot finish well: ids that cannot name
  files, two scans writing one file, an output folder holding the scans or not writable, a
  ``summary.csv``/``summary.json`` there that no run of ours wrote, another run writing there.
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

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from . import __version__
from .cohort_records import (
    DONE, FAILED, SKIPPED, SOFTWARE, CohortJob, about_run, check_id, check_outputs_apart, check_run_files, csv_text,
    decide, finished_record, fingerprint, new_record, read_record, read_summary_csv, recorded_files, scan_outputs,
    summary_row, write_record, write_summary,
)
from .errors import BrainUADError, OutputExists, SettingsError, internal_error_message
from .nifti import write_atomically
from .results import ScanOutputs, ScanResult, check_folder_writable, image_kinds, named_outputs, write_results
from .scan_list import ScanEntry, bids_entities, write_bids_description

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
    from .scan_reader import read_scan
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
            prepared.fingerprint = fingerprint(job, scan_hash, brain_hash, prepared.outputs)
            prepared.record = read_record(prepared.outputs.record)
            prepared.action, refusal = decide(prepared.record, prepared.fingerprint, prepared.outputs, job.overwrite)
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
    from .nifti import ScanError

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
    """The scan's files (``results``: the same as every door's) between an unfinished and a
    finished record; the numbers for its summary row."""
    from .analysis import analyse_scan

    entry, outputs = prepared.entry, prepared.outputs
    started = time.perf_counter()
    record = new_record(entry, job, prepared.fingerprint, outputs)
    write_record(outputs, record)
    analysis = analyse_scan(prepared.scan, model, brain_mask=prepared.brain, settings=job.settings)
    files = {**outputs.files, **_further_files(prepared, job, analysis)}
    write_results(analysis, files, threshold=job.threshold.value if job.threshold else None,
                  min_size_ml=job.min_size_ml, overwrite=True)
    result = ScanResult.of(analysis, job.model_metadata, job.threshold, job.min_size_ml)
    if result.atypical:
        warnings.warn(result.warning(entry.scan))
    write_record(outputs, finished_record(record, files, result.brain, result.numbers(),
                                          prepared.seconds + time.perf_counter() - started))
    return result.numbers()


def _further_files(prepared: _Prepared, job: CohortJob, analysis) -> dict[str, Path]:
    """The spread and the model's extra maps, known only once the analysis ran. The skip rule
    vouched for the other files; one of these already there is replaced only when this scan's
    record of ours listed it (or with ``overwrite``)."""
    entry = prepared.entry
    kinds = [kind for kind in image_kinds(analysis) if kind not in prepared.outputs.files]
    _, suffix = bids_entities(f"{entry.id}.nii.gz")
    files = named_outputs(job.out_dir, entry.id, kinds, entities=entry.entities, suffix=suffix).files
    ours = set(recorded_files(prepared.record, prepared.outputs.folder))
    for path in files.values():
        if path.exists() and path not in ours and not job.overwrite:
            raise OutputExists(f"{path}: already exists and was not written by a cohort run; not overwriting it "
                               "(use --overwrite)")
    return files


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
    check_folder_writable(out_dir)  # a read-only folder is the user's to fix, said before the work
    check_run_files(out_dir, overwrite=any(one.overwrite for one in used))
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
            write_summary(out_dir, rows, about_run(used))
            return CohortSummary(rows, out_dir, sum(row["status"] == FAILED for row in rows))
        return _merge_ranks(processes, entries, rows, out_dir, about_run(used))


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
                     lambda temporary: Path(temporary).write_text(csv_text(rows)), suffix=".csv")
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
