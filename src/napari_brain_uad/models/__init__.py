"""Step 3's networks: every model kind, and rebuilding one from a checkpoint's metadata alone.

Each kind is a :class:`ReconstructionModel` with a frozen hyper-parameter dataclass; a
checkpoint names the kind and stores the hyper-parameters as JSON, so loading never needs code
from the file. The plugin imports this package and the checkpoint reader, never the training
module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint, tensor_shapes
from ..preprocess import ModelSpaceSpec
from .autoencoders import AE, DAE, VAE, AEConfig, DAEConfig, VAEConfig
from .base import ModelConfig, ReconstructionModel
from .ddpm import DDPM, DDPMConfig, noise_levels
from .cddpm import CDDPM, CDDPMConfig
from .pddpm import PDDPM, PDDPMConfig
from .maediff import MAEDiff, MAEDiffConfig
from .vae3d import VAE3D, VAE3DConfig
from .sadm import SADM, SADMConfig
from .phanes import PHANES, PHANESConfig
from .registry import MODEL_KINDS, build_model, register_kind

# Registered here, in one list, rather than by each kind's module: this order is the order
# MODEL_KINDS lists them in (e.g. in "unknown kind" messages).
for _kind in (DDPM, CDDPM, PDDPM, MAEDiff, AE, VAE, DAE, VAE3D, SADM, PHANES):
    register_kind(_kind)
del _kind

__all__ = [
    "AE",
    "AEConfig",
    "DAE",
    "DAEConfig",
    "VAE",
    "VAEConfig",
    "VAE3D",
    "VAE3DConfig",
    "CDDPM",
    "CDDPMConfig",
    "DDPM",
    "DDPMConfig",
    "MAEDiff",
    "MAEDiffConfig",
    "MODEL_KINDS",
    "PDDPM",
    "PDDPMConfig",
    "SADM",
    "SADMConfig",
    "PHANES",
    "PHANESConfig",
    "ModelConfig",
    "ReconstructionModel",
    "build_model",
    "load_model",
    "noise_levels",
    "register_kind",
    "save_model",
]


def save_model(
    path: str | Path, model: ReconstructionModel, extra: dict[str, Any] | None = None, *, overwrite: bool = False
) -> Path:
    """Write a model with its metadata (plus training details in ``extra``) as a checkpoint."""
    return save_checkpoint(path, model.state_dict(), {**(extra or {}), **model.metadata()}, overwrite=overwrite)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[ReconstructionModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint's metadata and load its weights (no code from the file)."""
    metadata = read_metadata(path)
    kind = metadata["kind"]
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; this version knows {', '.join(MODEL_KINDS)}")
    try:
        spec = ModelSpaceSpec.from_dict(metadata["model_space"]) if "model_space" in metadata else ModelSpaceSpec()
        # First on the "meta" device, which allocates nothing: a card declaring a network far
        # larger than its weights (huge channel counts) is refused before any memory is taken.
        with torch.device("meta"):
            skeleton = build_model(kind, metadata.get("hyperparameters", {}), spec)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: its hyper-parameters do not describe a valid {kind} ({error})") from None
    _check_shapes(path, kind, skeleton, tensor_shapes(path))
    model = build_model(kind, metadata.get("hyperparameters", {}), spec)
    state, metadata = load_checkpoint(path, device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: the weights do not fit the {kind} its metadata describes ({first_line})") from None
    return model.to(device).eval(), metadata


def _check_shapes(path, kind: str, skeleton: ReconstructionModel, shapes: dict[str, tuple[int, ...]]) -> None:
    """The network the card describes must be the one the file holds, tensor for tensor."""
    expected = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(name for name in set(expected) & set(shapes) if expected[name] != shapes[name])
    if missing or unexpected or wrong:
        first = (f"{wrong[0]} holds {shapes[wrong[0]]}, the card's network {expected[wrong[0]]}" if wrong
                 else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise CheckpointError(f"{path}: the weights do not fit the {kind} its metadata describes ({first})")
