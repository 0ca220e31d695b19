"""Real sample scans: a registry of public files, fetched with pooch or taken from a local folder.

The registry is ``sample_data/samples.json`` at the top of the repository, its one source
(``scripts/build_sample_registry.py`` rebuilds it; ``sample_data/README.md`` describes the
samples). A source checkout or editable install reads that file; a built package carries a copy
made at build time (``setup.py``) as ``registries/samples.json``, beside the model registry's
``models.json``. It names each file by its path in a local data folder laid out like the
project's ``../shared/data``, with its dataset, licence, a public URL at a fixed commit and its
SHA256.

Where a file comes from, in order:
1. the folder named by ``NAPARI_BRAIN_UAD_DATA`` (offline machines, firewalls, tests, CI);
2. the user's cache (``pooch.os_cache("napari-brain-uad")`` or ``NAPARI_BRAIN_UAD_CACHE``);
3. a download from the public URL, hash-checked, with a progress bar.
``NAPARI_BRAIN_UAD_OFFLINE=1`` forbids step 3. The cache, the switch and the download are the
model registry's too (``downloads.py``). When no step yields the file the user gets a
:class:`SampleDataUnavailable` saying where it looked. :func:`fetch_into` gathers files into a
folder laid out the same way, for ``NAPARI_BRAIN_UAD_DATA`` on a machine without internet.

No Qt or napari import here; the napari sample commands are in ``_samples.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np

from .downloads import OFFLINE_VARIABLE, cache_dir, download, downloads_off, file_sha256
from .errors import BrainUADError

DATA_DIR_VARIABLE = "NAPARI_BRAIN_UAD_DATA"


class SampleDataUnavailable(BrainUADError):
    """A sample file is in none of the local folder, the cache or the network."""


# In a source checkout (src/napari_brain_uad beside sample_data/) the registry is read where it
# is kept, so there is nothing to rebuild after editing it; an installed package has its copy.
_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_REGISTRY = _PACKAGE_DIR.parents[1] / "sample_data" / "samples.json"


def registry_source() -> Traversable:
    """Where :func:`registry` reads from: the repository's ``sample_data/samples.json`` in a source
    checkout or editable install, else the copy built into the package."""
    if _PACKAGE_DIR.parent.name == "src" and _CHECKOUT_REGISTRY.is_file():
        return _CHECKOUT_REGISTRY
    return files("napari_brain_uad.registries") / "samples.json"


@lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    return json.loads(registry_source().read_text())


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
    """Path to a verified copy of one registry file, fetching it into the cache if needed.

    ``progressbar`` is passed to pooch: ``True`` for a console bar, ``False`` for none, or a
    function making a tqdm-like object (napari's ``progress``), called only if a download starts.
    """
    return _find_or_download(local_path, cache_dir(), progressbar)


def _find_or_download(local_path: str, download_dir: Path, progressbar: Any) -> Path:
    """The local folder's or the cache's verified copy, else a download into ``download_dir``."""
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
        return _download(local_path, entry, download_dir / local_path, progressbar)
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


def fetch_into(local_paths: Iterable[str], folder: Path, *, progressbar: Any = True) -> tuple[list[Path], list[str]]:
    """Put verified copies of registry files in ``folder`` at their registry paths, so that
    ``NAPARI_BRAIN_UAD_DATA=folder`` serves them on a machine without internet.

    Each file is copied from the local folder or the cache when one holds it, else downloaded
    straight into ``folder`` (hash-checked). A file already in ``folder`` with the registered
    content is kept; one with other content is left as it is and reported, never overwritten.
    Returns the paths now in ``folder`` and one line for each file that is not there.
    """
    placed: list[Path] = []
    problems: list[str] = []
    for local_path in local_paths:
        target = folder / local_path
        if target.exists():
            if target.is_file() and _is_verified(target, _entry(local_path)):
                placed.append(target)
            else:
                problems.append(f"{target} exists with other content than the registry's; left as it is")
            continue
        try:
            found = _find_or_download(local_path, folder, progressbar)
        except SampleDataUnavailable as error:
            problems.append(str(error))
            continue
        if found != target:
            _copy_whole(found, target)
        placed.append(target)
    return placed, problems


def _copy_whole(source: Path, target: Path) -> None:
    """Copy through a temporary file in the target's folder, so an interrupted copy never leaves
    a partial file under the registry's name (which would then read as a user's file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as partial:
        try:
            with open(source, "rb") as handle:
                shutil.copyfileobj(handle, partial)
        except BaseException:
            Path(partial.name).unlink()
            raise
    os.replace(partial.name, target)


def build_parser() -> argparse.ArgumentParser:
    """The ``brain-uad-sample`` command's arguments (the documentation's tests parse with it)."""
    parser = argparse.ArgumentParser(
        prog="brain-uad-sample",
        description="Fetch sample scans (local folder, cache or download) and print their file paths.",
    )
    parser.add_argument("sample", nargs="?", choices=sample_names(), help="sample name; omit to list them")
    parser.add_argument(
        "--all", action="store_true",
        help="every file in the registry (the samples' layers and the extra contrasts and masks it lists)",
    )
    parser.add_argument(
        "--into", type=Path, metavar="DIR",
        help=f"put the files in DIR, laid out for {DATA_DIR_VARIABLE}=DIR on a machine without internet "
        "(files already there are kept; one with other content is reported, never overwritten)",
    )
    parser.add_argument("--first", action="store_true", help="print only the first file (the scan)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``brain-uad-sample [NAME | --all] [--into DIR]``: fetch samples and print their file paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all and args.sample:
        parser.error("give a sample name or --all, not both")
    if args.first and (args.all or args.into):
        parser.error("--first prints one sample's scan; it goes with neither --all nor --into")
    if args.sample is None and not args.all:
        if args.into:
            parser.error("--into needs a sample name or --all")
        for name, sample in registry()["samples"].items():
            print(f"{name}: {sample['display_name']}")
        return 0

    local_paths = list(registry()["files"]) if args.all else [layer["file"] for layer in sample_files(args.sample)]
    progressbar = sys.stderr.isatty()
    if args.into is not None:
        paths, problems = fetch_into(local_paths, args.into, progressbar=progressbar)
    else:
        paths, problems = [], []
        for local_path in local_paths:
            try:
                paths.append(fetch(local_path, progressbar=progressbar))
            except SampleDataUnavailable as error:
                problems.append(str(error))
    # The paths go out only when every file is there, so `napari $(brain-uad-sample NAME)`
    # never opens half a sample.
    if problems:
        for problem in problems:
            print(f"brain-uad-sample: {problem}", file=sys.stderr)
        return 1
    for path in paths[:1] if args.first else paths:
        print(path)
    if args.into is not None:
        print(f"brain-uad-sample: {len(paths)} files in {args.into}; to use them without internet, "
              f"set {DATA_DIR_VARIABLE}={args.into.resolve()}", file=sys.stderr)
    return 0
