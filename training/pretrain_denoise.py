"""ADDP's denoising pre-training of an encoder-decoder network (seed paper 000; no public code).

Before its own training, the network learns to predict the noise in noised healthy slices:

    x_σ = (x + σ·ε) / √(1 + σ²),  ε ~ N(0, I),  σ = 0.4               (paper eqs. 2 and 4)
    loss = ‖g(f(x_σ)) − ε‖²  (predicting ε beat predicting x, its Table IV)

Two variants (``pretrain`` in the run's settings, ``--pretrain`` on the command line):

- ``denoise-encoder-decoder`` (DPED): the whole network learns to denoise;
- ``denoise-decoder`` (DPD): the encoder is frozen and only the decoder learns. The paper's
  encoder was first trained on a classification task; ours has no labelled task on healthy
  scans, so it stays at its initial weights during this stage (the paper's second step only).

Afterwards everything is fine-tuned by the kind's own training (for SADM: its segmentation of
synthetic anomalies; for the AE and DAE: reconstruction). The kinds that offer it say so with
``ReconstructionModel.denoising_parts``. Only training uses this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from napari_brain_uad.models import ReconstructionModel
from napari_brain_uad.noise import gaussian_noise

# Paper, sec. III: "We set σ to 0.4".
ADDP_NOISE_SIGMA = 0.4
PRETRAIN_MODES = ("denoise-decoder", "denoise-encoder-decoder")


def noised_input(slices: torch.Tensor, noise: torch.Tensor, sigma: float = ADDP_NOISE_SIGMA) -> torch.Tensor:
    """x_σ = (x + σ·ε) / √(1 + σ²)."""
    return (slices + sigma * noise) / math.sqrt(1 + sigma**2)


def denoising_loss(predict_noise: Callable[[torch.Tensor], torch.Tensor], slices: torch.Tensor,
                   generator: torch.Generator | None = None, sigma: float = ADDP_NOISE_SIGMA) -> torch.Tensor:
    """Mean squared error of the predicted noise (paper eq. 4)."""
    noise = gaussian_noise(tuple(slices.shape), generator=generator, device=slices.device, dtype=slices.dtype)
    return F.mse_loss(predict_noise(noised_input(slices, noise, sigma)), noise)


def pretrain_denoising(
    model: ReconstructionModel,
    batches: Iterable[torch.Tensor],
    *,
    mode: str,
    learning_rate: float,
    sigma: float = ADDP_NOISE_SIGMA,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Pre-train ``model``'s network by denoising on ``batches`` of healthy slices; the losses.

    The encoder's parameters get back their trainable state afterwards, whatever the mode."""
    if mode not in PRETRAIN_MODES:
        raise ValueError(f"unknown pre-training {mode!r}; known: {', '.join(PRETRAIN_MODES)}")
    parts = model.denoising_parts()
    if parts is None:
        raise ValueError(f"the {model.kind} kind has no encoder-decoder network for denoising pre-training")
    trained = parts.decoder if mode == "denoise-decoder" else [*parts.encoder, *parts.decoder]
    frozen = parts.encoder if mode == "denoise-decoder" else []
    was_trainable = [p.requires_grad for p in frozen]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam(trained, lr=learning_rate)
    losses = []
    model.train()
    try:
        for step, slices in enumerate(batches, start=1):
            loss = denoising_loss(parts.predict_noise, slices, generator, sigma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        for parameter, trainable in zip(frozen, was_trainable):
            parameter.requires_grad_(trainable)
    return losses
