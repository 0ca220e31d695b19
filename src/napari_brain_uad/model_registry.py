"""Which models a user can pick by name: the one bundled in the package, and downloadable ones.

The registry (``registries/models.json``, shipped inside the package) maps a model name
to either a file inside the package (``file``) or a public URL (``url``), always with the
file's SHA256. ``resolve_model`` turns what the user typed (nothing, a name, or a path to a
checkpoint of their own) into a verified local file:

- no name: the registry's ``default`` model, the bundled one;
- a bundled name: the file inside the package, checked against its hash so a damaged install
  is reported rather than used;
- a downloadable name: the user's cache (``NAPARI_BRAIN_UAD_CACHE`` or pooch's), else a
  download with pooch, hash-checked, with a progress bar; ``NAPARI_BRAIN_UAD_OFFLINE=1``
  forbids it;
- a name the user registered (``brain-uad calibrate --name``): their calibrated copy, listed in
  ``user_models.json`` in the cache folder with its SHA256, and refused when the file changed;
- anything else: a path to a checkpoint file.

When the user names no model, the scan's contrast decides (:func:`model_for_contrast`): the
registry's ``default_by_contrast`` maps a contrast to its model, and ``default`` stands in for a
contrast without one. What a scan's contrast is, is guessed here too, once for every door
(:func:`guess_contrast`, from file, folder, layer and DICOM series names); ``model_card`` warns
with the same guess when a scan looks like another contrast than the model's.

Checkpoints are read with ``checkpoint.read_metadata``/``models.load_model``, which never run
code from the file; what a card says is ``model_card``'s. Downloads, the cache and the offline
switch are ``downloads``'s, shared with the sample registry. No Qt, napari or torch import here.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import model_card
from .downloads import OFFLINE_VARIABLE, cache_dir, download, downloads_off, file_sha256
from .errors import BrainUADError

if TYPE_CHECKING:
    from .nifti import NiftiGeometry


class ModelUnavailable(BrainUADError, ValueError):
    """A model name or path that gives no usable checkpoint file; the message says why."""


@lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    return json.loads((files("napari_brain_uad.registries") / "models.json").read_text())


USER_MODELS_FILE = "user_models.json"


def model_names() -> list[str]:
    """Every model a user can pick by name: the registry's, then their own registered ones."""
    return [*registry()["models"], *user_models()]


def bundled_models_folder() -> Path:
    return Path(str(files("napari_brain_uad.bundled_models")))


def user_models() -> dict[str, dict[str, str]]:
    """The user's registered models: name -> {"path", "sha256"} (none when nothing is registered)."""
    index = cache_dir() / USER_MODELS_FILE
    if not index.is_file():
        return {}
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"{index}: the list of your registered models cannot be read ({error}); "
                               "fix it, or delete it and register your models again (brain-uad calibrate --name)"
                               ) from error
    # Written by us as {name: {"path": ..., "sha256": ...}}; anything else was edited by hand or
    # damaged, and would otherwise fail later, far from its cause.
    if not isinstance(entries, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)
            for entry in entries.values()):
        raise ModelUnavailable(f"{index}: the list of your registered models is not as written by brain-uad "
                               "(each name needs a 'path' and a 'sha256'); fix it, or delete it and register "
                               "your models again (brain-uad calibrate --name)")
    return {name: entry for name, entry in entries.items() if name not in registry()["models"]}


def check_user_model_name(name: str, path: str | os.PathLike, *, replace: bool = False) -> None:
    """Refuse, before any work, a name that cannot register ``path``: empty, with a slash, a
    registry model's name, or already naming another file of the user's (re-pointing a name
    silently would change what every later ``--model NAME`` analyses) unless ``replace``."""
    if not name or any(c in name for c in "/\\"):
        raise ModelUnavailable(f"{name!r} cannot name your model: give a name without slashes")
    if name in registry()["models"]:
        raise ModelUnavailable(f"{name!r} is the name of a model of the plugin; give your model another name")
    registered = user_models().get(name)
    if registered and Path(registered["path"]) != Path(path).resolve() and not replace:
        raise ModelUnavailable(f"{name!r} already names your model {registered['path']}; give another name, "
                               "or --overwrite to point it at the new file")


def register_user_model(name: str, path: str | os.PathLike, *, replace: bool = False) -> None:
    """Let every door pick the checkpoint ``path`` by ``name`` (kept with its SHA256)."""
    from .nifti import write_atomically

    check_user_model_name(name, path, replace=replace)
    path = Path(path).resolve()
    entries = {**user_models(), name: {"path": str(path), "sha256": file_sha256(path)}}
    index = cache_dir() / USER_MODELS_FILE
    index.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(entries, indent=1) + "\n"
    write_atomically(index, lambda temporary: Path(temporary).write_text(text), suffix=".json")


def _user_model(name: str, entry: dict[str, str]) -> Path:
    path = Path(entry["path"])
    if not path.is_file():
        raise ModelUnavailable(f"model {name}: its file {path} is gone; register it again (brain-uad calibrate --name)")
    if file_sha256(path) != entry["sha256"]:
        raise ModelUnavailable(f"model {name}: {path} changed since it was registered; register it again")
    return path


def default_model_name() -> str:
    return registry()["default"]


def resolve_model(name_or_path: str | os.PathLike | None = None, *, progressbar: Any = False) -> Path:
    """The local checkpoint file for a registry name, a path, or (None) the default model."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = default_model_name()
    text = str(name_or_path)
    entries = registry()["models"]
    if text in entries:
        return _fetch(text, entries[text], progressbar)
    mine = user_models()
    if text in mine:
        return _user_model(text, mine[text])
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelUnavailable(f"{path}: is not a file; give a checkpoint (.safetensors) or a model name")
    raise ModelUnavailable(
        f"{text}: no such checkpoint file, and not a model name (known: {', '.join(model_names())})"
    )


def _fetch(name: str, entry: dict[str, Any], progressbar: Any) -> Path:
    if "file" in entry:
        path = Path(str(files("napari_brain_uad.bundled_models") / entry["file"]))
        if not path.is_file():
            raise ModelUnavailable(f"model {name}: its file {path} is missing from the installed package")
        if file_sha256(path) != entry["sha256"]:
            raise ModelUnavailable(
                f"model {name}: {path} is damaged (its SHA256 differs from the registry's); reinstall the package"
            )
        return path
    cached = _cached_path(entry)
    if cached.is_file() and file_sha256(cached) == entry["sha256"]:
        return cached
    if downloads_off():
        raise ModelUnavailable(f"model {name} is not in the cache ({cached}) and downloads are off ({OFFLINE_VARIABLE})")
    try:
        return download(entry["url"], cached, entry["sha256"], progressbar)
    except Exception as error:  # network errors and hash mismatches (pooch deletes a bad download)
        raise ModelUnavailable(f"model {name}: download from {entry['url']} failed: {error}") from None


def _cached_path(entry: dict[str, Any]) -> Path:
    """Where a downloadable model lives in the user's cache."""
    return cache_dir() / "models" / entry["filename"]


def local_model_file(name: str) -> Path | None:
    """A registry model's verified local file when no download is needed (bundled, or cached),
    else None. A damaged bundled file raises :class:`ModelUnavailable`."""
    mine = user_models()
    if name in mine:
        return _user_model(name, mine[name])
    entry = registry()["models"][name]
    if "file" not in entry and not _cached_path(entry).is_file():
        return None
    return _fetch(name, entry, progressbar=False)


def registry_cards() -> list[dict[str, Any]]:
    """One entry per registry model: name, where it comes from and, when available locally, its card."""
    cards = []
    for name, entry in registry()["models"].items():
        card: dict[str, Any] = {"name": name, "default": name == default_model_name(),
                                "source": "bundled" if "file" in entry else entry["url"],
                                "description": entry.get("description", "")}
        if "file" in entry:
            card.update(model_card.card(resolve_model(name)))
        else:
            cached = _cached_path(entry)
            card["cached"] = cached.is_file()
            if card["cached"]:
                card.update(model_card.card(cached))
        cards.append(card)
    for name, entry in user_models().items():
        card = {"name": name, "default": False, "source": f"registered by you: {entry['path']}"}
        try:
            card.update(model_card.card(_user_model(name, entry)))
        except BrainUADError as error:
            card["error"] = str(error)
        cards.append(card)
    return cards


# ------------------------------------------------------------------------------ the model for a scan's contrast

def _as_word(pattern: str) -> re.Pattern:
    """``pattern`` as a whole word of a lower-cased name: not part of a longer run of letters and digits."""
    return re.compile(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])")


# What scan names say about the contrast, tried in this order (the first match decides):
# - a BIDS name's suffix says it outright, whatever its other entities say ("acq-t1_FLAIR" is a
#   FLAIR; "ce-gad_T1w" a contrast-enhanced T1);
# - a T1-weighted FLAIR (a clinical T1 sequence; Siemens calls it "t1_tirm") is T1, before
#   "flair" or "dark-fluid" claims it;
# - "flair" and Siemens' "dark-fluid" name FLAIR anywhere in a name ("AXFLAIR", "T2FLAIR");
#   BraTS 2023 calls it "t2f";
# - a contrast-enhanced T1 before a plain one (BraTS: "t1c", "t1ce"; clinics: "T1 Gd", "T1+C");
# - T2 and BIDS' "T2w", but not T2* (gradient echo, another contrast);
# - T1, BIDS' "T1w", BraTS 2023's native "t1n", and the T1 sequences named without "T1".
def _bids_name(suffix: str, entity: str = "") -> re.Pattern:
    """A BIDS file name (``sub-<label>``, then ``_<key>-<value>`` entities, one of them ``entity``
    when given) ending in ``suffix``."""
    entities = r"(?:_[a-z]+-[a-z0-9]+)*"
    middle = f"{entities}_{entity}{entities}" if entity else entities
    return re.compile(rf"^sub-[a-z0-9]+{middle}_{suffix}(?:\.nii(?:\.gz)?)?$")


CONTRAST_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("T1c", _bids_name("t1w", entity="ce-[a-z0-9]+")),
    ("FLAIR", _bids_name("flair")),
    ("T2", _bids_name("t2w")),
    ("T1", _bids_name("t1w")),
    ("T1", re.compile(r"t1[-_ ]?(?:flair|tirm)")),
    ("FLAIR", re.compile(r"flair|dark[-_ ]?fluid")),
    ("FLAIR", _as_word(r"t2f")),
    ("T1c", _as_word(r"t1[-_ ]?(?:ce?|gd|post|\+c)")),
    # "Ax T1 Gad", "T1_SE+C": the contrast agent named after the T1 and its sequence.
    ("T1c", re.compile(r"(?<![a-z0-9])t1(?![0-9]).*(?:(?<![a-z])gad|(?<![a-z])gd(?![a-z])|\+c(?![a-z]))")),
    ("T2", _as_word(r"t2w?(?! ?\*)")),
    ("T1", _as_word(r"t1[wn]?|mp[-_ ]?rage|f?spgr")),
)


def guess_contrast(*names: str) -> str | None:
    """The contrast (``T1``, ``T1c``, ``T2``, ``FLAIR``) that scan names suggest, or None.
    ``names`` go from the most to the least telling: the first one that names a contrast decides."""
    for name in names:
        text = str(name or "").lower()
        for contrast, pattern in CONTRAST_PATTERNS:
            if pattern.search(text):
                return contrast
    return None


def scan_contrast(path: str | os.PathLike, *names: str, series_uid: str | None = None) -> str | None:
    """The contrast of a scan on disk, guessed before reading it: from ``names`` (an id, a layer
    name), then for a DICOM folder the SeriesDescription of the series that would be read
    (``series_uid``, else the largest; headers only), then the file's or folder's name."""
    path = Path(path)
    description = ""
    if path.is_dir():
        from .dicom import folder_series_description

        description = folder_series_description(path, series_uid)
    return guess_contrast(*names, description, path.name)


def read_scan_contrast(geometry: NiftiGeometry, *names: str) -> str | None:
    """The contrast of a scan already read (its geometry, as a napari layer carries it): from
    ``names`` (the layer's), then a DICOM series' description, then its file's or folder's name."""
    from .nifti import is_nifti_path

    description = ""
    if not is_nifti_path(geometry.source):  # a DICOM series: its header keeps the SeriesDescription
        from .dicom import header_description

        description = header_description(geometry)
    return guess_contrast(*names, description, Path(geometry.source).name)


class ModelPick(NamedTuple):
    """The model picked for a scan the user named no model for, and why."""

    name: str  # a registry model's name
    contrast: str | None  # the contrast guessed from the scan's names (None: they name none)
    by_contrast: bool  # the registry names a model for that contrast (else: the default model)

    @property
    def reason(self) -> str:
        return self.describe()

    def describe(self, hint: str = "", scans: int = 1) -> str:
        """One line for the user: ``FLAIR scan: using NAME (picked by contrast; HINT)``. ``hint``
        says how to choose another model at this door; ``scans``: how many scans it is for."""
        if self.contrast is None:
            what = "scan of unknown contrast" if scans == 1 else f"{scans} scans of unknown contrast"
            why = "no contrast in its name" if scans == 1 else "no contrast in their names"
        else:
            what = f"{self.contrast} scan" if scans == 1 else f"{scans} {self.contrast} scans"
            why = "picked by contrast" if self.by_contrast else f"no {self.contrast} model in the registry"
        model = self.name if self.by_contrast else f"the default model, {self.name}"
        return f"{what}: using {model} ({why}{'; ' + hint if hint else ''})"


def model_for_contrast(contrast: str | None) -> ModelPick:
    """The registry's model for a scan of ``contrast`` (``default_by_contrast``; any case), else
    its default model."""
    if contrast is not None:
        for listed, name in registry().get("default_by_contrast", {}).items():
            if listed.upper() == contrast.upper():
                return ModelPick(name, contrast, True)
    return ModelPick(default_model_name(), contrast, False)
