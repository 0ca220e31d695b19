"""What every model kind shares: hyper-parameters that round-trip through JSON, and one interface.

Every model reconstructs model-space slices (B, 1, H, W) in [0, 1] in one call, and knows its
own training loss; the training module and the reconstruction step call only these methods, so
a new kind needs no change there. Hyper-parameters live in a frozen dataclass so that a
checkpoint's metadata alone rebuilds the network.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
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
    ) -> torch.Tensor:
        """Scalar loss on a batch of healthy slices (B, 1, H, W) in [0, 1].

        ``brain_mask`` (B, 1, H, W, bool) marks the brain (for masking strategies that work
        on a fraction of it); ``generator`` draws every random number, so a seeded generator
        gives the same loss.
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

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "hyperparameters": self.config.to_dict(), "model_space": self.spec.to_dict()}


def random_uniform(shape, generator, device, low=0.0, high=1.0) -> torch.Tensor:
    """Uniform random numbers from ``generator`` (which may live on another device than ``device``)."""
    values = torch.rand(shape, generator=generator, device=_generator_device(generator, device))
    return (low + (high - low) * values).to(device)


def random_integers(low, high, shape, generator, device) -> torch.Tensor:
    values = torch.randint(low, high, shape, generator=generator, device=_generator_device(generator, device))
    return values.to(device)


def _generator_device(generator: torch.Generator | None, device) -> torch.device:
    return torch.device(device) if generator is None else generator.device
