"""Lists of scans as users keep them: a folder, a CSV file, or a BIDS dataset.

The worklist of the napari widget and the cohort commands read their scans here, so the three
forms mean the same thing everywhere; training reads its folders and CSV lists through
:func:`scans_in_folder` and :func:`read_csv_rows` too, adding its own columns. Each scan becomes a :class:`ScanEntry`: an id that names
its outputs, the scan (a NIfTI file or a folder holding a DICOM series), and optionally its
brain mask and a lesion mask to evaluate against.

- **Folder**: every NIfTI file in it and every subfolder that holds a DICOM series, sorted by
  name; the id is the file's stem or the subfolder's name. Masks need a CSV or BIDS.
- **CSV**: a header row with ``scan`` (or ``image``), and optionally ``id``, ``brain_mask`` and
  ``lesion_mask`` (or ``mask``). Relative paths are relative to the CSV, so a data folder can
  move whole; an empty cell means none.
- **BIDS** (a folder with ``dataset_description.json``): the images ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]``
  (suffix ``T1w`` unless asked otherwise), filtered by entities if asked (``{"acq": "mprage"}``).
  The id is the file's stem. Masks come from a derivatives folder (``derivatives/`` of the
  dataset unless another is given): the files of the same subject, session and entities that end
  in ``_mask.nii[.gz]``, ``desc-brain`` for the brain mask and ``label-lesion`` (or
  ``desc-lesion``) for the lesion mask. This is a small reader of our own, not pybids: it reads
  only the ``anat`` images and masks the plugin needs, and pybids' dependencies (SQLAlchemy,
  a database per dataset) would weigh more than what they would give here.

Every file named must exist, and ids must be unique (they name output files): a list that
breaks either rule is refused with a :class:`ScanListError` naming the line or file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BrainUADError
from .nifti import is_nifti_path, nifti_stem, scan_stem

BIDS_DESCRIPTION = "dataset_description.json"
DEFAULT_BIDS_SUFFIX = "T1w"
_CSV_SCAN_COLUMNS = ("scan", "image")
_CSV_LESION_COLUMNS = ("lesion_mask", "mask")
_BIDS_BRAIN = "brain"
_BIDS_LESION = "lesion"


class ScanListError(BrainUADError, ValueError):
    """A list of scans cannot be read; the message names the file or line and the problem."""


@dataclass(frozen=True)
class ScanEntry:
    """One scan of a list: its id (what its outputs are named after) and its files."""

    id: str
    scan: Path  # a NIfTI file or a folder holding a DICOM series
    brain_mask: Path | None = None
    lesion_mask: Path | None = None
    # BIDS entities of the scan ({"sub": "01", "ses": "1", ...}; empty for other lists): the
    # names of its derivatives.
    entities: tuple[tuple[str, str], ...] = ()


def read_scan_list(source: str | os.PathLike, *, bids_suffix: str = DEFAULT_BIDS_SUFFIX,
                   bids_entities: Mapping[str, str] | None = None,
                   derivatives: str | os.PathLike | None = None) -> list[ScanEntry]:
    """The scans of a folder, a CSV file or a BIDS dataset (see the module's text)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        entries = _from_csv(path)
    elif path.is_dir() and (path / BIDS_DESCRIPTION).is_file():
        entries = _from_bids(path, bids_suffix, dict(bids_entities or {}), derivatives)
    elif path.is_dir():
        entries = scans_in_folder(path)
    elif path.exists():
        raise ScanListError(f"{path}: not a folder, a CSV file or a BIDS dataset")
    else:
        raise ScanListError(f"{path}: no such file or folder")
    if not entries:
        raise ScanListError(f"{path}: holds no scans{_what_was_looked_for(path, bids_suffix, bids_entities)}")
    _check_unique(entries, path)
    return entries


def read_scan_sources(sources, *, bids_suffix: str = DEFAULT_BIDS_SUFFIX,
                      bids_entities: Mapping[str, str] | None = None,
                      derivatives: str | os.PathLike | None = None) -> list[ScanEntry]:
    """The scans of several sources named together (a command line's ``A.nii.gz B.nii.gz`` or
    ``cohort.csv``): a NIfTI file, or a folder holding a DICOM series, is one scan named by its
    stem — or, when several named this way share a stem (``data/*/T1.nii.gz``: one folder per
    patient), by their folder and stem (``patient01_T1``); a CSV file, a BIDS dataset or a folder
    of scans gives its list. Ids must be unique over all of them."""
    entries, named = [], []
    for source in sources:
        path = Path(source)
        if path.is_file() and is_nifti_path(path):
            named.append(len(entries))
            entries.append(ScanEntry(nifti_stem(path), path))
        elif path.is_dir() and not is_bids_dataset(path) and _holds_dicom(path):
            named.append(len(entries))
            entries.append(ScanEntry(scan_stem(path), path))
        else:
            entries.extend(read_scan_list(path, bids_suffix=bids_suffix, bids_entities=bids_entities,
                                          derivatives=derivatives))
    stems = [entries[index].id for index in named]
    for index in named:
        entry = entries[index]
        if stems.count(entry.id) > 1:
            parent = Path(os.path.abspath(entry.scan)).parent.name  # the folder as named, links not followed
            entries[index] = replace(entry, id=f"{scan_stem(parent) if parent else 'scan'}_{entry.id}")
    _check_unique(entries, Path(str(sources[0])) if len(sources) == 1 else Path("the scans given"))
    return entries


def _holds_dicom(folder: Path) -> bool:
    from .dicom import holds_dicom  # SimpleITK only when a folder is listed

    return holds_dicom(folder)


def is_bids_dataset(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / BIDS_DESCRIPTION).is_file()


# ---------------------------------------------------------------------------- a folder

def scans_in_folder(folder: Path) -> list[ScanEntry]:
    """The scans directly in ``folder`` (none when it holds none): its NIfTI files and its
    subfolders holding a DICOM series, sorted by name, hidden files left out."""
    from .dicom import holds_dicom  # SimpleITK only when a folder is listed

    entries = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.startswith("."):
            continue
        if item.is_file() and is_nifti_path(item):
            entries.append(ScanEntry(nifti_stem(item), item))
        elif item.is_dir() and holds_dicom(item):
            entries.append(ScanEntry(scan_stem(item), item))
    return entries


# ---------------------------------------------------------------------------- a CSV file

def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV list's column names and its rows with their line numbers (blank lines left out),
    names and cells stripped. Training's list reads its own columns through this too."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ScanListError(f"{path}: cannot be read as CSV ({error})") from error
    # Line 1 is the header; rows of empty cells are blank lines.
    return columns, [(line, row) for line, row in enumerate(rows, start=2) if any(row.values())]


def _from_csv(path: Path) -> list[ScanEntry]:
    columns, rows = read_csv_rows(path)
    scan_column = next((name for name in _CSV_SCAN_COLUMNS if name in columns), None)
    if scan_column is None:
        raise ScanListError(f"{path}: the header row must name a 'scan' column (and optionally 'id', "
                            f"'brain_mask', 'lesion_mask'); it has {', '.join(columns) or 'none'}")
    lesion_column = next((name for name in _CSV_LESION_COLUMNS if name in columns), None)
    entries = []
    for line, row in rows:
        where = f"{path}, line {line}"
        scan = csv_path(path, row.get(scan_column, ""), where, "scan", required=True)
        entries.append(ScanEntry(
            id=row.get("id") or scan_stem(scan),
            scan=scan,
            brain_mask=csv_path(path, row.get("brain_mask", ""), where, "brain mask"),
            lesion_mask=csv_path(path, row.get(lesion_column, "") if lesion_column else "", where, "lesion mask"),
        ))
    return entries


def csv_path(csv_file: Path, text: str, where: str, what: str, *, required: bool = False) -> Path | None:
    """The file a CSV cell names (relative to the CSV), which must exist; None for an empty cell."""
    if not text:
        if required:
            raise ScanListError(f"{where}: the {what} is empty")
        return None
    # Made absolute without following links: a linked file keeps its own name (its id).
    path = Path(os.path.abspath(csv_file.parent / text))
    if not path.exists():
        raise ScanListError(f"{where}: {what} {text} not found ({path})")
    return path


# ---------------------------------------------------------------------------- BIDS

_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")


def bids_entities(name: str) -> tuple[dict[str, str], str]:
    """The entities and the suffix of a BIDS file name: ``sub-01_ses-2_T1w.nii.gz`` gives
    ``({"sub": "01", "ses": "2"}, "T1w")``."""
    parts = nifti_stem(name).split("_")
    entities = {}
    for part in parts[:-1]:
        match = _ENTITY.match(part)
        if match:
            entities[match.group(1)] = match.group(2)
    return entities, parts[-1]


def _from_bids(root: Path, suffix: str, wanted: dict[str, str], derivatives: str | os.PathLike | None) -> list[ScanEntry]:
    derivatives_folder = Path(derivatives) if derivatives is not None else root / "derivatives"
    if derivatives is not None and not derivatives_folder.is_dir():
        raise ScanListError(f"{derivatives_folder}: the derivatives folder does not exist")
    masks = _bids_masks(derivatives_folder) if derivatives_folder.is_dir() else []
    entries = []
    for subject in sorted(root.glob("sub-*")):
        if not subject.is_dir():
            continue
        anat_folders = [subject / "anat", *sorted(session / "anat" for session in subject.glob("ses-*"))]
        for anat in anat_folders:
            if not anat.is_dir():
                continue
            for image in sorted(anat.iterdir(), key=lambda p: p.name):
                if not (image.is_file() and is_nifti_path(image)):
                    continue
                entities, image_suffix = bids_entities(image.name)
                if image_suffix != suffix or any(entities.get(k) != v for k, v in wanted.items()):
                    continue
                entries.append(ScanEntry(
                    id=nifti_stem(image), scan=image,
                    brain_mask=_matching_mask(masks, entities, _BIDS_BRAIN, image),
                    lesion_mask=_matching_mask(masks, entities, _BIDS_LESION, image),
                    entities=tuple(entities.items()),
                ))
    return entries


def _bids_masks(folder: Path) -> list[tuple[dict[str, str], Path]]:
    """Every ``*_mask.nii[.gz]`` under a derivatives folder, with its entities."""
    found = []
    for path in sorted(folder.rglob("*_mask.nii*")):
        if path.is_file() and is_nifti_path(path):
            entities, suffix = bids_entities(path.name)
            if suffix == "mask":
                found.append((entities, path))
    return found


def _matching_mask(masks, image_entities: dict[str, str], kind: str, image: Path) -> Path | None:
    """The derivative mask of ``kind`` (brain or lesion) that shares every entity of the image."""
    matches = [path for entities, path in masks
               if (entities.get("desc") == kind or (kind == _BIDS_LESION and entities.get("label") == kind))
               and all(entities.get(key) == value for key, value in image_entities.items())]
    if len(matches) > 1:
        names = ", ".join(str(path) for path in matches)
        raise ScanListError(f"{image}: more than one {kind} mask matches it: {names}")
    return matches[0] if matches else None


# ---------------------------------------------------------------------------- checks

# An id names files and folders (``<id>_anomaly_map.nii.gz``, a session's ``<id>/``): file
# systems take 255 bytes per name, and the longest suffix we add is under 55.
MAX_ID_BYTES = 200


def id_problem(entry_id: str) -> str | None:
    """Why ``entry_id`` cannot name a scan's outputs, or None when it can."""
    if not entry_id or entry_id in (".", "..") or any(sep in entry_id for sep in ("/", "\\", "\0")):
        return f"its id {entry_id!r} cannot name output files (empty, '.', '..', or holding '/' or '\\')"
    if len(entry_id.encode("utf-8")) > MAX_ID_BYTES:
        return (f"its id {entry_id[:40]!r}… is {len(entry_id.encode('utf-8'))} bytes long; ids name output files, "
                f"which take at most {MAX_ID_BYTES}")
    return None


def _check_unique(entries: list[ScanEntry], source: Path) -> None:
    """Refuse, before any work, ids that cannot name outputs or that two scans share."""
    seen: dict[str, Path] = {}
    for entry in entries:
        problem = id_problem(entry.id)
        if problem:
            raise ScanListError(f"{source}: {entry.scan}: {problem}; give another in the list's 'id' column")
        if entry.id in seen:
            raise ScanListError(f"{source}: two scans have the id {entry.id!r} ({seen[entry.id]} and {entry.scan}); "
                                "ids name the outputs, so they must differ (give an 'id' column)")
        seen[entry.id] = entry.scan


def _what_was_looked_for(path: Path, suffix: str, entities) -> str:
    if is_bids_dataset(path):
        filters = "".join(f", {key}-{value}" for key, value in (entities or {}).items())
        return f" (looked for sub-*/[ses-*/]anat/*_{suffix}.nii[.gz]{filters})"
    if path.is_dir():
        return " (looked for .nii/.nii.gz files and DICOM series folders)"
    return ""


def write_bids_description(folder: str | os.PathLike, name: str, generated_by: Mapping[str, str]) -> Path:
    """``dataset_description.json`` of a BIDS-derivatives folder the plugin writes (kept as it is
    when one is already there)."""
    path = Path(folder) / BIDS_DESCRIPTION
    if not path.exists():
        from .nifti import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)
        description = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                       "GeneratedBy": [dict(generated_by)]}
        write_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(description, indent=2) + "\n"),
                         suffix=".json")
    return path
