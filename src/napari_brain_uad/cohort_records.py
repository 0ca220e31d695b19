"""What a cohort leaves in its output folder besides the maps: each scan's record and the skip
rule it serves, and the run's summary. ``cohort`` runs the scans; this module only decides and
records (no torch, no process pool). File names and what each file holds are ``results``'.

- **The record and the skip rule** (:func:`decide`). Beside each scan's outputs a JSON record
  holds the SHA256 of the scan, its brain mask and the model, and the settings that change the
  outputs. It is written first as unfinished, then (after every output) as finished, listing
  every file written. A re-run skips a scan whose finished record matches and whose outputs are
  all there; it redoes an unfinished one (an interrupted run); it refuses to replace outputs of
  another scan, model or settings, or files it did not write, unless ``overwrite``.
- **The summary** (:data:`SUMMARY_COLUMNS`): ``DIR/summary.csv`` and ``DIR/summary.json``, one
  row per scan (done, skipped or failed, with the error, and the model it was scored with), in
  the list's order. The JSON is the whole truth and names the CSV it goes with by its SHA256
  (:func:`write_summary`, :func:`read_summary`); a summary that no run of ours wrote is never
  replaced without ``overwrite`` (:func:`check_run_files`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .analysis import AnalysisSettings
from .downloads import file_sha256
from .errors import OutputExists, SettingsError
from .nifti import temporary_beside, write_atomically
from .results import COHORT_KINDS, ScanOutputs, named_outputs, same_file_key, write_json
from .scan_list import ScanEntry, bids_entities, id_problem
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


def about_run(jobs: Sequence[CohortJob]) -> dict:
    """A run with one model (one job) as :meth:`CohortJob.about` says it; with several, each one's."""
    if len(jobs) == 1:
        return jobs[0].about()
    return {"software": SOFTWARE, "models": [{key: value for key, value in job.about().items() if key != "software"}
                                             for job in jobs]}


# ------------------------------------------------------------------------------ output names

def check_id(entry: ScanEntry) -> None:
    """Ids name files: refuse one that cannot (the rule is ``scan_list.id_problem``'s; entries
    made by a script, not read from a list, come through here too)."""
    problem = id_problem(entry.id)
    if problem:
        raise SettingsError(f"{entry.scan}: {problem}; give another in the list's 'id' column")


def scan_outputs(entry: ScanEntry, out_dir: str | os.PathLike, *, with_mask: bool) -> ScanOutputs:
    """The files of ``entry`` in ``out_dir`` known before its analysis (``results`` names them),
    and its record."""
    _, suffix = bids_entities(f"{entry.id}.nii.gz")
    kinds = [kind for kind in COHORT_KINDS if with_mask or kind != "mask"]
    return named_outputs(out_dir, entry.id, kinds, entities=entry.entities, suffix=suffix)


def check_outputs_apart(entries: Sequence[ScanEntry], jobs: Sequence[CohortJob]) -> None:
    """Refuse, before any work, a cohort in which two scans would write the same file (one
    scan's outputs would replace the other's, and both would report done), or a scan's output
    would replace an input, or an output folder that is the scans' own (a second run read the
    maps written there as scans: "49 findings, 54 mL" in an anomaly map)."""
    inputs = {same_file_key(path): entry.id for entry in entries
              for path in (entry.scan, entry.brain_mask, entry.lesion_mask) if path is not None}
    written: dict[str, str] = {}
    for entry, job in zip(entries, jobs):
        if Path(os.path.abspath(entry.scan)).parent == Path(os.path.abspath(job.out_dir)):  # as named: links kept
            raise SettingsError(f"--out-dir {job.out_dir} holds the scans themselves ({entry.scan.name}): a later run "
                                "would read the maps written there as scans; choose a folder apart from the scans")
        outputs = scan_outputs(entry, job.out_dir, with_mask=True)
        for path in [*outputs.files.values(), outputs.record]:
            key = same_file_key(path)
            if key in written and written[key] != entry.id:
                raise SettingsError(f"scans {written[key]!r} and {entry.id!r} would both write {path.name}; give them "
                                    "ids that differ more (the list's 'id' column), or score them into different "
                                    "folders")
            if key in inputs:
                raise SettingsError(f"{path}: scoring {entry.id!r} would replace the input of {inputs[key]!r}; "
                                    "choose an output folder apart from the scans")
            written[key] = entry.id


# ------------------------------------------------------------------------------ record and skip rule

def fingerprint(job: CohortJob, scan_sha256: str, brain_sha256: str | None, outputs: ScanOutputs) -> dict:
    """What a finished scan's outputs depend on; a re-run with the same skips it. Its
    ``outputs`` are the files known before the analysis (the spread and a model's extra maps
    follow from the model and settings already in it)."""
    found = {"scan_sha256": scan_sha256, "brain_mask_sha256": brain_sha256, "model_sha256": job.model_sha256,
             "settings": job.settings_record(), "outputs": sorted(path.name for path in outputs.files.values())}
    return json.loads(json.dumps(found))  # as it reads back from JSON: tuples become lists


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _ours(document) -> bool:
    return isinstance(document, dict) and isinstance(document.get("software"), dict) \
        and document["software"].get("name") == SOFTWARE["name"]


def recorded_files(record: dict | None, folder: Path) -> list[Path]:
    """The files a record of ours says its run wrote."""
    names = (record or {}).get("outputs") if _ours(record) else None
    return [folder / name for name in names.values()] if isinstance(names, dict) else []


def decide(record: dict | None, found: dict, outputs: ScanOutputs, overwrite: bool) -> tuple[str, str | None]:
    """("skip" | "run" | "refuse", why refused) for a scan with this ``record`` and fingerprint."""
    if overwrite:
        return "run", None
    if _ours(record):
        if not record.get("finished"):
            return "run", None  # an interrupted run of ours: its partial outputs are replaced
        if record.get("match") == found:
            needed = [*outputs.files.values(), *recorded_files(record, outputs.folder)]
            return ("skip", None) if all(path.is_file() for path in needed) else ("run", None)
        stored = record.get("match") or {}
        changed = [what for key, what in (("scan_sha256", "scan"), ("brain_mask_sha256", "brain mask"),
                                          ("model_sha256", "model"), ("settings", "settings"), ("outputs", "outputs"))
                   if stored.get(key) != found[key]]
        return "refuse", (f"{outputs.record}: the {' and '.join(changed) or 'run'} changed since these outputs were "
                          "made; not replacing them (use --overwrite, or another --out-dir)")
    existing = [path for path in [*outputs.files.values(), outputs.record] if path.exists()]
    if existing:
        return "refuse", f"{existing[0]}: already exists and was not written by a cohort run; not overwriting it " \
                         "(use --overwrite)"
    return "run", None


def new_record(entry: ScanEntry, job: CohortJob, found: dict, outputs: ScanOutputs) -> dict:
    """The record written before the analysis: unfinished, so that should the run stop half-way
    the next one knows the partial outputs are its own to replace."""
    return {"format": RECORD_FORMAT, "software": SOFTWARE, "finished": False, "id": entry.id,
            "scan": str(entry.scan), "brain_mask": str(entry.brain_mask) if entry.brain_mask else None,
            "model": job.shown_name, "match": found,
            "outputs": {kind: path.name for kind, path in outputs.files.items()}}


def finished_record(record: dict, files: dict[str, Path], brain: str, result: dict, seconds: float) -> dict:
    """The record written last, once every file in ``files`` (by kind) is: only now is the scan
    done for a later run."""
    return {**record, "finished": True, "outputs": {kind: path.name for kind, path in files.items()},
            "brain": brain, "result": result, "seconds": round(seconds, 2),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_record(outputs: ScanOutputs, document: dict) -> None:
    write_json(outputs.record, document)


def summary_row(entry: ScanEntry, status: str, *, error: str = "", seconds: float = 0.0,
                result: dict | None = None, warnings: Sequence[str] = (), model: str = "") -> dict:
    result = result or {}
    return {"id": entry.id, "scan": str(entry.scan), "status": status, "error": error,
            "seconds": round(float(seconds), 2), "brain_ml": result.get("brain_ml"),
            "flagged_ml": result.get("flagged_ml"), "findings": result.get("findings"),
            "largest_finding_ml": result.get("largest_finding_ml"), "typicality": result.get("typicality"),
            "model": model, "warnings": "; ".join(dict.fromkeys(warnings))}


# ------------------------------------------------------------------------------ the summary

def csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
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


def _sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def write_summary(out_dir: Path, rows: Sequence[dict], about: dict) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json`` (the run's model and settings, counts, rows).

    Two files cannot be replaced in one step, so the JSON holds everything and names its CSV by
    SHA256: both are written to temporaries, then the JSON is renamed into place, then the CSV.
    A stop between the two renames leaves the new JSON beside the previous CSV, which
    :func:`read_summary` tells by the hash and rebuilds from the JSON's rows; the JSON also
    names the CSV it replaces, so the next run knows that CSV for its own (:func:`check_run_files`)."""
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON
    text = csv_text(rows)
    counts = {status: sum(row["status"] == status for row in rows) for status in (DONE, SKIPPED, FAILED)}
    document = {**about, "counts": counts, "columns": list(SUMMARY_COLUMNS), "scans": list(rows),
                "note": "flagged_ml, findings and largest_finding_ml at the threshold in settings, on each scan's "
                        "own grid; typicality: how unlike the model's healthy calibration scans the scan is (a robust "
                        "z-score; above the model's limit its findings are unreliable)",
                "summary_csv_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "replaces_csv_sha256": _sha256(csv_path)}
    temporaries = {json_path: temporary_beside(json_path, ".json"), csv_path: temporary_beside(csv_path, ".csv")}
    try:
        Path(temporaries[json_path]).write_text(json.dumps(document, indent=2, default=float) + "\n", encoding="utf-8")
        Path(temporaries[csv_path]).write_text(text, encoding="utf-8")
        for path, temporary in temporaries.items():  # the JSON first: it is the whole truth
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)
    return csv_path, json_path


def _summary_document(json_path: Path) -> dict | None:
    """The summary JSON of a run of ours, or None (none there, or not ours)."""
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if _ours(document) and isinstance(document.get("scans"), list) else None


def read_summary(out_dir: str | os.PathLike) -> dict:
    """The summary of the last run in ``out_dir`` (``summary.json``'s document). A CSV other than
    the one the JSON names (a run stopped between the two renames) is rebuilt from the JSON's
    rows first, so the two agree again."""
    out_dir = Path(out_dir)
    document = _summary_document(out_dir / SUMMARY_JSON)
    if document is None:
        raise SettingsError(f"{out_dir / SUMMARY_JSON}: no brain-uad summary there")
    expected = document.get("summary_csv_sha256")
    if expected and _sha256(out_dir / SUMMARY_CSV) != expected:
        text = csv_text(document["scans"])
        write_atomically(out_dir / SUMMARY_CSV, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"),
                         suffix=".csv")
    return document


def check_run_files(out_dir: Path, overwrite: bool) -> None:
    """Before any work: refuse to replace a ``summary.json`` or ``summary.csv`` that no run of
    ours wrote (a user's own file of that name), unless ``overwrite``.

    Ours is decided by content, not by the name or the time: a summary JSON is ours when it
    carries our software block and rows; a CSV when such a JSON names it by its SHA256, either
    as its own or as the one it replaced (a run stopped between the renames). Summaries of
    earlier versions carried no hash: there our JSON beside a CSV with our exact header counts."""
    if overwrite:
        return
    csv_path, json_path = Path(out_dir) / SUMMARY_CSV, Path(out_dir) / SUMMARY_JSON
    document = _summary_document(json_path)
    if json_path.exists() and document is None:
        raise OutputExists(f"{json_path}: already exists and was not written by brain-uad; not replacing it (move it "
                           "away, or choose another --out-dir)")
    if not csv_path.exists():
        return
    if document is not None:
        if "summary_csv_sha256" in document:
            if _sha256(csv_path) in (document["summary_csv_sha256"], document.get("replaces_csv_sha256")):
                return
        elif _first_line(csv_path) == ",".join(SUMMARY_COLUMNS):
            return
    raise OutputExists(f"{csv_path}: already exists and was not written by this folder's brain-uad runs; not "
                       "replacing it (move it away, or choose another --out-dir)")


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().rstrip("\r\n")
