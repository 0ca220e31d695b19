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


def model_names() -> list[str]:
    return list(registry()["models"])


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
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelUnavailable(f"{path}: is not a file; give a checkpoint (.safetensors) or a model name")
    raise ModelUnavailable(
        f"{text}: no such checkpoint file, and not a model name (known: {', '.join(entries)})"
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
    return cards
