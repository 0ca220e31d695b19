"""The model kinds by name, and building a fresh model of one from its hyper-parameters.

The table lives apart from ``models/__init__.py`` and starts empty: the package registers every
kind into it after importing them. A kind whose model is built on another kind (SADM's frozen
stage-I model) can therefore import :func:`build_model` from here at module level, without
importing the package that imports it — which was an import cycle while the table sat in
``__init__``. The lookup happens when a model is built, by which time the package has
registered every kind.
"""

from __future__ import annotations

from ..preprocess import ModelSpaceSpec
from .base import ReconstructionModel

MODEL_KINDS: dict[str, type[ReconstructionModel]] = {}
"""Every model kind by its ``kind`` name, in the order the package registers them."""


def register_kind(model_class: type[ReconstructionModel]) -> type[ReconstructionModel]:
    """Make ``model_class`` buildable and loadable under its ``kind`` name (once per name)."""
    known = MODEL_KINDS.get(model_class.kind)
    if known is not None and known is not model_class:
        raise ValueError(f"model kind {model_class.kind!r} is already {known.__qualname__}")
    MODEL_KINDS[model_class.kind] = model_class
    return model_class


def build_model(kind: str, hyperparameters: dict | None = None, spec: ModelSpaceSpec = ModelSpaceSpec()):
    """A fresh (untrained) model of ``kind`` from JSON-like hyper-parameters."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")
    model_class = MODEL_KINDS[kind]
    return model_class(model_class.config_class.from_dict(hyperparameters or {}), spec)
