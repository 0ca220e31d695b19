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

Checkpoints are read with ``checkpoint.read_metadata``/``models.load_model``, which never run
code from the file; what a card says is ``model_card``'s. Downloads, the cache and the offline
switch are ``downloads``'s, shared with the sample registry. No Qt, napari or torch import here.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from . import model_card
from .downloads import OFFLINE_VARIABLE, cache_dir, download, downloads_off, file_sha256
from .errors import BrainUADError


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
        raise ModelUnavailable(f"{index}: the list of your registered models cannot be read ({error})") from error
    return {name: entry for name, entry in entries.items() if name not in registry()["models"]}


def register_user_model(name: str, path: str | os.PathLike) -> None:
    """Let every door pick the checkpoint ``path`` by ``name`` (kept with its SHA256)."""
    from .io import write_atomically

    if not name or name in registry()["models"] or any(c in name for c in "/\\"):
        raise ModelUnavailable(f"{name!r} cannot name your model: it is empty, has a slash, or is a registry model's name")
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
