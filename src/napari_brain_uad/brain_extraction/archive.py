"""The tensors of a TorchScript archive, read without running anything in it.

deepbet ships its networks as TorchScript archives (a zip holding ``data.pkl``, the modules'
TorchScript ``code/`` and one file per tensor under ``data/``) and loads them with
``torch.jit.load``, which compiles and runs that code; ``torch.load(weights_only=True)``
refuses such archives. Here ``data.pkl`` is unpickled with a closed list of what it may name —
module objects (kept as inert attribute dictionaries), the tensor-rebuild function, storage
types and ``OrderedDict`` — and anything else stops the read; tensors are rebuilt from their
bytes in ``data/``. The ``code/`` files are never read. What comes out is a state dict, for a
network defined in our own code (``network.py``).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ArchiveError(ValueError):
    """The archive holds something other than modules and tensors, or is not an archive."""


class _ModuleRecord:
    """Stands in for a TorchScript module: only its attributes (submodules, tensors) are kept."""

    def __init__(self, *_):
        self.attributes: dict = {}

    def __setstate__(self, state):
        self.attributes = dict(state)


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    tensor = torch.empty((0,), dtype=storage.dtype)
    tensor.set_(storage, offset, size, stride)
    return tensor


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ModuleRecord,), {})
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise ArchiveError(f"the archive names {module}.{name}, which a file of weights has no need for")

    def persistent_load(self, key):
        kind, storage_type, name, _location, _count = key
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise ArchiveError(f"unexpected persistent object {kind!r} in the archive")
        raw = self.archive.read(f"{self.root}/data/{name}")
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the archive's module tree, by its dotted name (``down0.block1…weight``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise ArchiveError(f"{path}: not a TorchScript archive (no single data.pkl)")
            root = pickles[0].split("/")[0]
            tree = _TensorsOnlyUnpickler(io.BytesIO(archive.read(pickles[0])), archive, root).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as error:
        raise ArchiveError(f"{path}: cannot be read as a TorchScript archive ({error})") from None
    state: dict[str, torch.Tensor] = collections.OrderedDict()
    _collect(tree, "", state)
    return state


def _collect(node, prefix: str, state: dict) -> None:
    if isinstance(node, _ModuleRecord):
        # A module pickled without state (no __setstate__ call) has no attributes.
        for name, value in getattr(node, "attributes", {}).items():
            _collect(value, f"{prefix}{name}.", state)
    elif isinstance(node, torch.Tensor):
        state[prefix.rstrip(".")] = node.clone()
