"""What every model kind shares: hyper-parameters that round-trip through JSON, and one interface.

Every model reconstructs model-space slices (B, 1, H, W) in [0, 1] in one call, and knows its
own training loss; the training module and the reconstruction step call only these methods, so
a new kind needs no change there. Hyper-parameters live in a frozen dataclass so that a
checkpoint's metadata alone rebuilds the network.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from ..preprocess import ModelSpaceSpec


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every kind's hyper-parameters: JSON round trip with unknown names refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} hyper-parameters: {', '.join(sorted(unknown))}")
        hints = typing.get_type_hints(cls)
        known = {}
        for name, value in values.items():
            # JSON has no tuples; the dataclasses declare tuples so that configs stay hashable.
            if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
                value = tuple(value)
            known[name] = value
        return cls(**known)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DenoisingParts:
    """What ADDP's denoising pre-training (``brain_uad_training.pretrain_denoise``) needs of a
    kind: its network as a noise predictor (B, 1, H, W) -> (B, 1, H, W), and that network's
    parameters split into encoder and decoder."""

    predict_noise: Callable[[torch.Tensor], torch.Tensor]
    encoder: list[torch.nn.Parameter]
    decoder: list[torch.nn.Parameter]


class ReconstructionModel(torch.nn.Module):
    """A network that turns a (possibly anomalous) slice into a pseudo-healthy one.

    Subclasses set ``kind`` and ``config_class`` and implement :meth:`training_loss` and
    :meth:`reconstruct`. ``uses_noise_level`` says whether ``t`` means anything to the model
    (diffusion models) or is ignored (autoencoders); ``samples_differ`` whether two
    reconstructions of the same slice differ (fresh noise each time), which the scorers over N
    samples (Mahalanobis) need.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    uses_noise_level: ClassVar[bool] = False
    samples_differ: ClassVar[bool] = False
    # True for kinds that take whole model-space volumes (B, 1, X, Y, Z) instead of slices:
    # reconstruction and training then hand them volumes (see models.vae3d).
    volumetric: ClassVar[bool] = False
    # Names of the maps a kind computes beside its pseudo-healthy reconstruction, each of the
    # input's shape (SADM: its segmentation network's output; PHANES: its anomaly mask and its
    # perceptual difference). The scorers that use them say so (``scoring.Scorer.needs_maps``),
    # and the widget shows them as layers.
    extra_maps: ClassVar[tuple[str, ...]] = ()
    # True for kinds that sit on another trained model, frozen (SADM): training needs its
    # ``base_model``.
    needs_base_model: ClassVar[bool] = False
    # True for kinds whose training loss can leave voxels out (``training_loss(excluded=...)``):
    # lesions in a patient's training scan, marked by an exclusion mask.
    excludes_voxels: ClassVar[bool] = False
    # The scorer of the kind's paper (a name in ``scoring.SCORERS``), for a checkpoint whose card
    # names none (not yet calibrated); None: ``model_card.FALLBACK_SCORER``. The kind declares it
    # so that a new kind needs no change in ``model_card``.
    default_scorer: ClassVar[str | None] = None

    def __init__(self, config: ModelConfig, spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, not {type(config).__name__}")
        self.config = config
        self.spec = spec

    def training_loss(
        self,
        slices: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        excluded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss on a batch of healthy slices (B, 1, H, W) in [0, 1].

        ``brain_mask`` (B, 1, H, W, bool) marks the brain (for masking strategies that work
        on a fraction of it); ``generator`` draws every random number, so a seeded generator
        gives the same loss. ``excluded`` (B, 1, H, W, bool) marks voxels the loss must ignore;
        only kinds with :attr:`excludes_voxels` accept it.
        """
        raise NotImplementedError

    def reconstruct(
        self,
        slices: torch.Tensor,
        t: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pseudo-healthy slices (B, 1, H, W) in [0, 1]."""
        raise NotImplementedError

    def reconstruct_with_maps(
        self,
        slices: torch.Tensor,
        t: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction and the kind's :attr:`extra_maps` (none for most kinds)."""
        return self.reconstruct(slices, t, generator), {}

    @property
    def stage(self) -> str | None:
        """The training stage of a kind trained in stages (PHANES: "vae", then "inpainting"), or
        None. Each stage has its own loss; training keeps the best model of the latest stage."""
        return None

    def denoising_parts(self) -> DenoisingParts | None:
        """The network ADDP's denoising pre-training can start, or None when the kind has no
        encoder-decoder network it fits (diffusion models already learn by denoising)."""
        return None

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "hyperparameters": self.config.to_dict(), "model_space": self.spec.to_dict()}


def random_uniform(shape, generator, device, low=0.0, high=1.0) -> torch.Tensor:
    """Uniform random numbers from ``generator`` (which may live on another device than ``device``)."""
    values = torch.rand(shape, generator=generator, device=_generator_device(generator, device))
    return (low + (high - low) * values).to(device)


def random_integers(low, high, shape, generator, device) -> torch.Tensor:
    values = torch.randint(low, high, shape, generator=generator, device=_generator_device(generator, device))
    return values.to(device)


def random_permutation(count: int, generator, device) -> torch.Tensor:
    """A random order of 0 … count − 1 from ``generator`` (which may live on another device)."""
    return torch.randperm(count, generator=generator, device=_generator_device(generator, device)).to(device)


def _generator_device(generator: torch.Generator | None, device) -> torch.device:
    return torch.device(device) if generator is None else generator.device
