"""What every download of the plugin shares: the user's cache, the offline switch, hash checks.

Two registries fetch files from the internet - sample scans (``sample_registry``) and models
(``model_registry``) - and both must behave the same way for a user behind a firewall or on an
offline machine, so the rules live here once:

- the cache: ``NAPARI_BRAIN_UAD_CACHE`` if set, else pooch's per-user cache folder for
  ``napari-brain-uad``;
- the offline switch: ``NAPARI_BRAIN_UAD_OFFLINE`` set to anything but ``0`` forbids downloads
  (each registry says in its own error what it would have fetched);
- a download goes through pooch and is checked against its registered SHA256; a file whose
  hash differs is deleted, never kept.

No Qt, napari or torch import here (pooch only when something is cached or downloaded).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

CACHE_DIR_VARIABLE = "NAPARI_BRAIN_UAD_CACHE"
OFFLINE_VARIABLE = "NAPARI_BRAIN_UAD_OFFLINE"


def cache_dir() -> Path:
    """The folder downloads are kept in, between sessions and across both registries."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured)
    import pooch

    return Path(pooch.os_cache("napari-brain-uad"))


def downloads_off() -> bool:
    """Whether the user forbade downloads (``NAPARI_BRAIN_UAD_OFFLINE`` set to anything but 0)."""
    return os.environ.get(OFFLINE_VARIABLE, "").strip() not in ("", "0")


def file_sha256(path: Path) -> str:
    """SHA256 of a file's bytes, read in blocks so a large scan or checkpoint is never held whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str | None, progressbar: Any) -> Path:
    """Download ``url`` to ``target`` with pooch, checked against ``sha256`` (None: unchecked);
    a download whose hash differs raises and is not kept.

    ``progressbar`` is passed to pooch: ``True`` for a console bar, ``False`` for none, or a
    function making a tqdm-like object (napari's ``progress``), called only here, once a download
    really starts, so no empty progress bar appears when the file was already there.
    """
    import pooch

    target.parent.mkdir(parents=True, exist_ok=True)
    if callable(progressbar):
        progressbar = progressbar()
    fetched = pooch.retrieve(
        url,
        known_hash=None if sha256 is None else f"sha256:{sha256}",
        fname=target.name,
        path=target.parent,
        downloader=pooch.HTTPDownloader(progressbar=progressbar, timeout=60),
    )
    return Path(fetched)
