"""The one checkpoint format every model uses: safetensors weights plus JSON metadata, one file.

A checkpoint is a ``.safetensors`` file whose header metadata holds, under the key
``napari_brain_uad``, a JSON document: the format version, the model kind and its
hyper-parameters, the model-space spec, noise and ``t_test``, training data and licence,
training settings, validation losses and calibrated thresholds. safetensors stores only
tensors and strings, so loading a checkpoint never runs code from the file; pickle-based torch
files are refused with a message rather than unpickled.

Rebuilding a network from the metadata is the models module's job; this module only writes
and reads the container and checks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import BrainUADError, OutputExists
from .nifti import plain_file_mode, write_atomically

FORMAT_VERSION = 1
METADATA_KEY = "napari_brain_uad"
SUFFIX = ".safetensors"


class CheckpointError(BrainUADError, ValueError):
    """A file cannot be used as a checkpoint; the message names the file and the problem."""


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write weights and metadata atomically (temporary name, then rename).

    ``metadata`` must be JSON-serialisable and name the model ``kind``; the format version is
    added here. An existing file is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path}: a checkpoint's name must end in {SUFFIX}")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path}: already exists; not overwriting it")
    if "kind" not in metadata:
        raise CheckpointError(f"{path}: the metadata must name the model 'kind'")
    document = {**metadata, "format_version": FORMAT_VERSION}
    try:
        text = json.dumps(document)
    except TypeError as error:
        raise CheckpointError(f"{path}: the metadata is not JSON-serialisable ({error})") from None
    # safetensors wants contiguous tensors that do not share memory.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in state_dict.items()}

    def write(temporary: str) -> None:
        save_file(tensors, temporary, metadata={METADATA_KEY: text})
        os.chmod(temporary, plain_file_mode())  # safetensors recreates the file owner-only

    return write_atomically(path, write)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata alone (cheap: the weights are not read)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for malformed files
        raise CheckpointError(f"{path}: {_not_safetensors(path, error)}") from None
    return _checked_metadata(path, header)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the checkpoint, from its header (no weights are read)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:
        raise CheckpointError(f"{path}: {_not_safetensors(path, error)}") from None


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Weights and metadata of a checkpoint, after checking its format and version."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        state_dict = load_file(str(path), device=str(device))
    except Exception as error:
        raise CheckpointError(f"{path}: the weights cannot be read, the file looks truncated ({error})") from None
    return state_dict, metadata


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def _not_safetensors(path: Path, error: Exception) -> str:
    with open(path, "rb") as handle:
        start = handle.read(9)
    # A safetensors file starts with its JSON header's length (8 bytes, little-endian) and the
    # header's "{": such a file that does not open is a damaged or truncated one, whatever its
    # first byte (a length ending in 0x80 once read as a pickle's opcode).
    if len(start) == 9 and start[8:9] == b"{" and int.from_bytes(start[:8], "little") < 100 * 2**20:
        return f"a safetensors checkpoint that is damaged or truncated ({error}); download or copy it again"
    # torch.save writes a zip archive (PK..) or, in old versions, a bare pickle (0x80 protocol).
    if start.startswith(b"PK") or start[:1] == b"\x80":
        return (
            "is a pickle-based torch file; such files can run code when loaded, so only "
            "safetensors checkpoints written by napari-brain-uad are accepted"
        )
    return f"not a safetensors checkpoint, or truncated ({error})"


def _checked_metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: a safetensors file without napari-brain-uad metadata (not one of our checkpoints)")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({error})") from None
    version = metadata.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: its metadata has no format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this napari-brain-uad reads "
            f"({FORMAT_VERSION}); update the plugin"
        )
    if version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format {version}")
    if "kind" not in metadata:
        raise CheckpointError(f"{path}: its metadata does not name the model kind")
    return metadata
