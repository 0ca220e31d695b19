"""A training run's settings: a config file (TOML or JSON) and/or command-line flags.

Every setting has a default that follows the papers where they give one (Adam, batch 32,
learning rate 1e-4, held-out healthy validation, best checkpoint by validation loss). The
settings are stored in every checkpoint the run writes, so a model says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_brain_uad.brain_mask import EXCLUSION_GROWTH_MM
from napari_brain_uad.errors import BrainUADError
from napari_brain_uad.models import MODEL_KINDS, ReconstructionModel
from napari_brain_uad.preprocess import ModelSpaceSpec

from .augment import AugmentationSettings
from .pretrain_denoise import PRETRAIN_MODES


class ConfigError(BrainUADError, ValueError):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class TrainingConfig:
    data: str | tuple[str, ...] = ""  # folder of NIfTI scans, CSV (image, brain_mask), or a list of files
    output: str = ""  # folder for best/last checkpoints, the resume state and the log
    brain_masks: str | None = None  # folder of brain masks (None: the scans are skull-stripped)
    exclude_subjects: tuple[str, ...] = ()  # left out entirely (e.g. a healthy test set); name prefixes
    kind: str = "ddpm"
    model: dict = field(default_factory=dict)  # the kind's hyper-parameters (see napari_brain_uad.models)
    modality: str = "T1"
    spacing_mm: float = 2.0
    in_plane: tuple[int, int] = (96, 96)
    bias_correction: str | None = None  # "n4": N4 on every scan, training and test (the thesis's pipeline)
    data_description: str = ""
    data_licence: str = ""
    steps: int = 3000
    batch_size: int = 32  # per process; slices, or volumes for a volumetric kind
    learning_rate: float = 1e-4
    # Largest gradient norm per step (None: no clipping). A spike in one step of a small batch
    # can otherwise throw a VAE's KL term off for good (the first vae3d run did).
    gradient_clip_norm: float | None = None
    seed: int = 0
    validation_fraction: float = 0.1
    validation_slices: int = 64  # for a volumetric kind (vae3d): validation volumes (all, if fewer)
    validate_every: int = 100
    augment: bool | None = None  # None: the kind's default (on for slice kinds, off for volumetric ones)
    pretrain_encoder_steps: int = 0  # cDDPM: masked pre-training of the context encoder first
    # ADDP's denoising pre-training before the kind's own training: "denoise-decoder" or
    # "denoise-encoder-decoder" for pretrain_steps steps (SADM's U-Net, the AE and the DAE)
    pretrain: str | None = None
    pretrain_steps: int = 0
    # SADM: the trained reconstruction model it sits on, frozen (a model name or a checkpoint path)
    base_model: str | None = None
    augmentation: dict = field(default_factory=dict)  # AugmentationSettings probabilities
    # Thick clinical slices: with this probability a training slice is the mean of 2 up to
    # thickest_slice model-space slices (at 2 mm, 4 to 8 mm), as a 2D acquisition looks there.
    thick_slice_probability: float = 0.0
    thickest_slice: int = 4
    # Exclusion masks (the training list's exclude_mask column) are grown by this much.
    exclude_dilation_mm: float = EXCLUSION_GROWTH_MM
    device: str = "auto"

    def __post_init__(self):
        if not self.data:
            raise ConfigError("'data' is required: a folder of healthy NIfTI scans, a CSV file, or a list of files")
        if not self.output:
            raise ConfigError("'output' is required: the folder the checkpoints are written to")
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"unknown model kind {self.kind!r}; known kinds: {', '.join(MODEL_KINDS)}")
        for name in ("steps", "batch_size", "validation_slices", "validate_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"'{name}' must be at least 1, not {getattr(self, name)}")
        if self.pretrain_encoder_steps < 0:
            raise ConfigError(f"'pretrain_encoder_steps' must be 0 or more, not {self.pretrain_encoder_steps}")
        if self.pretrain_encoder_steps and self.kind != "cddpm":
            raise ConfigError("'pretrain_encoder_steps' applies to the cddpm kind only (it has the context encoder)")
        if self.pretrain is not None:
            if self.pretrain not in PRETRAIN_MODES:
                raise ConfigError(f"unknown 'pretrain' {self.pretrain!r}; known: {', '.join(PRETRAIN_MODES)}")
            if self.pretrain_steps < 1:
                raise ConfigError("'pretrain' needs 'pretrain_steps' (--pretrain-steps) of at least 1")
            if MODEL_KINDS[self.kind].denoising_parts is ReconstructionModel.denoising_parts:
                raise ConfigError(f"the {self.kind} kind has no encoder-decoder network for denoising pre-training "
                                  "(sadm, ae and dae have)")
        elif self.pretrain_steps:
            raise ConfigError("'pretrain_steps' needs 'pretrain' (denoise-decoder or denoise-encoder-decoder)")
        needs_base = MODEL_KINDS[self.kind].needs_base_model
        if needs_base and not self.base_model:
            raise ConfigError(f"the {self.kind} kind sits on a trained reconstruction model: give 'base_model' "
                              "(--base-model NAME|PATH, e.g. ixi-t1-dae-n4)")
        if self.base_model and not needs_base:
            raise ConfigError(f"'base_model' applies to kinds that sit on another model (sadm), not {self.kind}")
        if self.augment is None:
            object.__setattr__(self, "augment", not MODEL_KINDS[self.kind].volumetric)
        if self.augment and MODEL_KINDS[self.kind].volumetric:
            raise ConfigError(
                f"the {self.kind} kind trains on whole volumes, and the augmentation works on slices; "
                "set augment = false (--no-augment)"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"'learning_rate' must be positive, not {self.learning_rate}")
        if self.gradient_clip_norm is not None and not self.gradient_clip_norm > 0:
            raise ConfigError(f"'gradient_clip_norm' must be positive, not {self.gradient_clip_norm}")
        if not 0.0 <= self.thick_slice_probability <= 1.0:
            raise ConfigError(f"'thick_slice_probability' must be between 0 and 1, not {self.thick_slice_probability}")
        if self.thick_slice_probability and self.thickest_slice < 2:
            raise ConfigError(f"thick slices need 'thickest_slice' of at least 2 model-space slices, "
                              f"not {self.thickest_slice}")
        if self.thick_slice_probability and MODEL_KINDS[self.kind].volumetric:
            raise ConfigError(f"thick-slice augmentation works on slices; the {self.kind} kind trains on volumes")
        if not self.exclude_dilation_mm >= 0:
            raise ConfigError(f"'exclude_dilation_mm' must be 0 or more, not {self.exclude_dilation_mm}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"'validation_fraction' must be in [0, 1), not {self.validation_fraction}")
        try:
            self.model_space_spec()
            self.augmentation_settings()
            MODEL_KINDS[self.kind].config_class.from_dict(self.model)
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None

    def model_space_spec(self) -> ModelSpaceSpec:
        return ModelSpaceSpec(spacing_mm=float(self.spacing_mm), in_plane=tuple(int(n) for n in self.in_plane),
                              modality=self.modality, bias_correction=self.bias_correction)

    def augmentation_settings(self) -> AugmentationSettings:
        return AugmentationSettings(**self.augmentation)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["data"] = self.data if isinstance(self.data, str) else list(self.data)
        values["in_plane"] = list(self.in_plane)
        values["exclude_subjects"] = list(self.exclude_subjects)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(values)
        if isinstance(values.get("data"), list):
            values["data"] = tuple(str(p) for p in values["data"])
        for name in ("in_plane", "exclude_subjects"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or JSON file; relative paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(path.read_text())
        else:
            values = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the settings must be a table of names and values")
    for name in ("data", "output", "brain_masks"):
        value = values.get(name)
        if isinstance(value, str) and value:
            values[name] = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
        elif isinstance(value, list):
            values[name] = [str((path.parent / v).resolve()) if not Path(v).is_absolute() else v for v in value]
    return values
