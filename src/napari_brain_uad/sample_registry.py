"""Real sample scans: a registry of public files, fetched with pooch or taken from a local folder.

The registry (``registries/samples.json`` inside the package, beside the model registry's
``models.json``; ``scripts/build_sample_registry.py`` rebuilds it) names each file by its path
in a local data folder laid out like the project's ``../shared/data``, with its dataset,
licence, a public URL at a fixed commit and its SHA256.

Where a file comes from, in order:
1. the folder named by ``NAPARI_BRAIN_UAD_DATA`` (offline machines, firewalls, tests, CI);
2. the user's cache (``pooch.os_cache("napari-brain-uad")`` or ``NAPARI_BRAIN_UAD_CACHE``);
3. a download from the public URL, hash-checked, with a progress bar.
``NAPARI_BRAIN_UAD_OFFLINE=1`` forbids step 3. The cache, the switch and the download are the
model registry's too (``downloads.py``). When no step yields the file the user gets a
:class:`SampleDataUnavailable` saying where it looked.

No Qt or napari import here; the napari sample commands are in ``_samples.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from .downloads import OFFLINE_VARIABLE, cache_dir, download, downloads_off, file_sha256
from .errors import BrainUADError

DATA_DIR_VARIABLE = "NAPARI_BRAIN_UAD_DATA"


class SampleDataUnavailable(BrainUADError):
    """A sample file is in none of the local folder, the cache or the network."""


@lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    text = (files("napari_brain_uad.registries") / "samples.json").read_text()
    return json.loads(text)


def sample_names() -> list[str]:
    return list(registry()["samples"])


def mask_content_hash(mask: np.ndarray) -> str:
    """Hash of a binary mask's voxels and shape, independent of how the file was compressed."""
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    digest = hashlib.sha256(repr(mask.shape).encode())
    digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()


def _entry(local_path: str) -> dict[str, Any]:
    try:
        return registry()["files"][local_path]
    except KeyError:
        raise KeyError(f"{local_path!r} is not in the sample registry") from None


def fetch(local_path: str, *, progressbar: Any = True) -> Path:
    """Path to a verified copy of one registry file, fetching it if needed.

    ``progressbar`` is passed to pooch: ``True`` for a console bar, ``False`` for none, or a
    function making a tqdm-like object (napari's ``progress``), called only if a download starts.
    """
    entry = _entry(local_path)
    looked: list[str] = []

    data_dir = os.environ.get(DATA_DIR_VARIABLE)
    if data_dir:
        candidate = Path(data_dir) / local_path
        if candidate.is_file():
            if _is_verified(candidate, entry):
                return candidate
            looked.append(f"{candidate} exists but its content differs from the registry's (hash)")
        else:
            looked.append(f"{candidate} does not exist ({DATA_DIR_VARIABLE})")
    else:
        looked.append(f"no local folder ({DATA_DIR_VARIABLE} is not set)")

    cached = cache_dir() / local_path
    if cached.is_file() and _is_verified(cached, entry):
        return cached
    looked.append(f"{cached} is not in the cache")

    if downloads_off():
        looked.append(f"downloads are off ({OFFLINE_VARIABLE} is set)")
        raise SampleDataUnavailable(_unavailable(local_path, looked))
    try:
        return _download(local_path, entry, cached, progressbar)
    except SampleDataUnavailable:
        raise
    except Exception as error:  # network errors come in many types (requests, OSError, ...)
        looked.append(f"download from {entry['url']} failed: {error}")
        raise SampleDataUnavailable(_unavailable(local_path, looked)) from None


def _unavailable(local_path: str, looked: list[str]) -> str:
    return (
        f"sample file {local_path} is unavailable:\n  - "
        + "\n  - ".join(looked)
        + f"\nSet {DATA_DIR_VARIABLE} to a folder holding it, or connect to the internet."
    )


def _download(local_path: str, entry: dict[str, Any], target: Path, progressbar: Any) -> Path:
    if "derived" not in entry:
        return download(entry["url"], target, entry["sha256"], progressbar)

    # A brain mask derived from a label map: the download is pinned by the hash of the mask
    # it yields, since the derived file's bytes depend on how it is compressed.
    import nibabel as nib

    labels_path = download(entry["url"], target.with_name(target.name + ".labels.nii.gz"), None, progressbar)
    try:
        labels = nib.load(labels_path)
        mask = np.asarray(labels.dataobj) > 0
        if mask_content_hash(mask) != entry["mask_sha256"]:
            raise SampleDataUnavailable(
                f"sample file {local_path}: the label map downloaded from {entry['url']} does not "
                "give the registered brain mask (hash mismatch); it was deleted"
            )
        derived = nib.Nifti1Image(mask.astype(np.uint8), labels.affine, labels.header)
        derived.set_data_dtype(np.uint8)
        nib.save(derived, target)
    finally:
        labels_path.unlink(missing_ok=True)
    return target


def _is_verified(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a local or cached file is the registered one (by bytes, or for a derived mask,
    by the hash of its voxels)."""
    if file_sha256(path) == entry["sha256"]:
        return True
    if "derived" not in entry:
        return False
    import nibabel as nib

    try:
        return mask_content_hash(np.asarray(nib.load(path).dataobj) > 0) == entry["mask_sha256"]
    except Exception:
        return False


def sample_files(sample: str) -> list[dict[str, Any]]:
    """The layers of one sample, each with the local path of its file."""
    try:
        return registry()["samples"][sample]["layers"]
    except KeyError:
        raise KeyError(f"unknown sample {sample!r}; known: {', '.join(sample_names())}") from None


def fetch_sample(sample: str, *, progressbar: Any = True) -> list[Path]:
    return [fetch(layer["file"], progressbar=progressbar) for layer in sample_files(sample)]


def build_parser() -> argparse.ArgumentParser:
    """The ``brain-uad-sample`` command's arguments (the documentation's tests parse with it)."""
    parser = argparse.ArgumentParser(
        prog="brain-uad-sample",
        description="Fetch a sample scan (local folder, cache or download) and print its file paths.",
    )
    parser.add_argument("sample", nargs="?", choices=sample_names(), help="sample name; omit to list them")
    parser.add_argument("--first", action="store_true", help="print only the first file (the scan)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``brain-uad-sample NAME``: fetch a sample and print the paths of its files."""
    args = build_parser().parse_args(argv)
    if args.sample is None:
        for name, sample in registry()["samples"].items():
            print(f"{name}: {sample['display_name']}")
        return 0
    try:
        paths = fetch_sample(args.sample, progressbar=sys.stderr.isatty())
    except SampleDataUnavailable as error:
        print(f"brain-uad-sample: {error}", file=sys.stderr)
        return 1
    for path in paths[:1] if args.first else paths:
        print(path)
    return 0
