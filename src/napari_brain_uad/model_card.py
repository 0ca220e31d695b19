"""What a user should know about a model before trusting it, and the defaults it brings.

A model's card is read from its checkpoint's metadata alone (``checkpoint.read_metadata``,
which runs no code from the file): kind, model space (contrast, spacing, slice size, bias
correction), training data and licence, validation loss, default scorer, calibrated thresholds,
measured results, limits and the command that trained it. The widget shows :func:`summary`,
``brain-uad models`` prints :func:`card`, and every door warns through
:func:`modality_mismatch` when a scan's name suggests another contrast than the model's
(the guess from names is ``model_registry.guess_contrast``'s).

No Qt, napari or torch import at module level: a card is read without them. Only a default
scorer that must come from the model's kind imports the kinds (and so torch), when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# The scorer for a model whose card names none: the thesis's best single-reconstruction score.
FALLBACK_SCORER = "ssim-ens"

_TRAINING_DATA_SHOWN = ("description", "licence", "training_subjects", "validation_subjects", "training_slices",
                        "training_volumes")


def default_scorer(metadata: Mapping[str, Any]) -> str:
    """The scorer the model was calibrated with, else its kind's own, else :data:`FALLBACK_SCORER`."""
    return metadata.get("default_scorer") or kind_scorer(metadata.get("kind")) or FALLBACK_SCORER


def kind_scorer(kind: str | None) -> str | None:
    """The scorer a model kind declares as its paper's (``ReconstructionModel.default_scorer``:
    SADM adds its segmentation to SSIM, PHANES weighs the residual by its perceptual map, the 3D
    VAE and MAEDiff use the l1 residual), or None for a kind without one or an unknown kind."""
    from .models import MODEL_KINDS  # here, not at the top: see the module docstring

    kind_class = MODEL_KINDS.get(kind) if isinstance(kind, str) else None
    return kind_class.default_scorer if kind_class is not None else None


def card(path: str | os.PathLike) -> dict[str, Any]:
    """The card of a checkpoint file, as a JSON-ready dictionary."""
    from .checkpoint import read_metadata

    metadata = read_metadata(path)
    return {
        "file": str(path),
        "kind": metadata["kind"],
        "model_space": metadata.get("model_space"),
        "hyperparameters": metadata.get("hyperparameters"),
        "training_data": {key: value for key, value in metadata.get("training_data", {}).items()
                          if key in _TRAINING_DATA_SHOWN},
        "validation_best_loss": metadata.get("validation", {}).get("best_loss"),
        "default_scorer": metadata.get("default_scorer"),
        "thresholds": metadata.get("thresholds", {}),
        "typicality": metadata.get("typicality"),
        "calibrated_for_scanner": metadata.get("calibrated_for_scanner"),
        "results": metadata.get("results", {}),
        "limits": metadata.get("limits", []),
        "training_command": metadata.get("training_command"),
    }


def summary(metadata: Mapping[str, Any]) -> str:
    """Two lines: what the model is (kind, contrast, spacing, slice size, bias correction) and
    what it was trained on."""
    space = metadata.get("model_space") or {}
    data = metadata.get("training_data") or {}
    in_plane = " × ".join(str(n) for n in space.get("in_plane", []))
    n4 = ", N4 bias correction" if space.get("bias_correction") == "n4" else ""
    return (f"{metadata.get('kind', '?')}, {space.get('modality', '?')}, {space.get('spacing_mm', '?')} mm, "
            f"{in_plane}{n4}\ntrained on: {data.get('description') or 'not described'}")


def lesion_direction_scorer(metadata: Mapping[str, Any]) -> str | None:
    """The residual that counts only the lesion direction of the model's contrast (``scoring``'s
    rule: darker on T1, brighter on T2 and FLAIR), or None."""
    from .scoring import lesion_direction_scorer as for_modality

    return for_modality((metadata.get("model_space") or {}).get("modality"))


def modality_mismatch(metadata: Mapping[str, Any], scan_contrast: str | None) -> str | None:
    """A warning when the scan's contrast (as ``model_registry`` guesses it from its names) is
    another than the model was trained on."""
    model_modality = (metadata.get("model_space") or {}).get("modality")
    if model_modality and scan_contrast and scan_contrast.upper() != str(model_modality).upper():
        return (f"the scan looks like {scan_contrast} but the model was trained on {model_modality}; its findings "
                "may be meaningless")
    return None
