"""Step 3 of the data flow: pseudo-healthy reconstructions of a model-space volume.

The volume's axial slices go through the model in batches on the chosen device; N samples
with fresh noise each (for Mahalanobis scoring). A volumetric model (the 3D VAE) gets the
whole volume at once instead of its slices. Long work reports progress through a callback
and stops when a cancel callback says so; no Qt here, the widget turns these into a progress
bar and a Cancel button. A GPU that runs out of memory gets smaller batches, then the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import Cancelled  # noqa: F401 (raised here; callers import it from here too)
from .models import ReconstructionModel


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU; otherwise the device named."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def reconstruct_volume(
    model: ReconstructionModel,
    volume: np.ndarray,
    *,
    samples: int = 1,
    t: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Reconstructions of a model-space volume; see :func:`reconstruct_volume_with_maps`."""
    reconstructions, _ = reconstruct_volume_with_maps(
        model, volume, samples=samples, t=t, batch_size=batch_size, device=device, seed=seed, progress=progress,
        cancelled=cancelled)
    return reconstructions


def reconstruct_volume_with_maps(
    model: ReconstructionModel,
    volume: np.ndarray,
    *,
    samples: int = 1,
    t: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reconstructions of a model-space volume (X, Y, Z), as (samples, X, Y, Z) float32 in [0, 1].

    ``t`` is the noise level of diffusion models (default: the model's ``t_test``); several
    levels give each sample as the mean over them (the thesis's 250/500/750 ensemble).
    ``batch_size`` slices go through the model at once (default: 32 on a GPU, 8 on a CPU, where
    larger batches are slower per slice).
    ``progress(done, total)`` is called after each batch (total = samples × slices);
    ``cancelled()`` is checked before each batch and raises :class:`Cancelled` when true.
    A volumetric model (``model.volumetric``, e.g. the 3D VAE) takes the whole volume at once:
    ``batch_size`` does not apply, progress counts samples and cancel is polled between them.
    The second value holds the model's ``extra_maps`` in the same layout (empty for most kinds).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"a model-space volume (X, Y, Z) is needed, got shape {volume.shape}")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    device = pick_device(device) if isinstance(device, str) else device
    if batch_size is None:
        batch_size = 8 if device.type == "cpu" else 32
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    generator_device = "cpu" if device.type == "mps" else device
    generator = torch.Generator(device=generator_device)
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    if model.volumetric:
        return _reconstruct_whole_volume(model, volume, samples, t, device, generator, seed, progress, cancelled)

    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)))[:, None]  # (Z, 1, X, Y)
    jobs = [(sample, start) for sample in range(samples) for start in range(0, slices.shape[0], batch_size)]
    out = np.empty((samples, *slices.shape), dtype=np.float32)
    maps = {name: np.empty_like(out) for name in model.extra_maps}
    total, done = samples * slices.shape[0], 0
    model.eval()
    for sample, start in jobs:
        if cancelled is not None and cancelled():
            raise Cancelled("reconstruction cancelled")
        batch = slices[start : start + batch_size]
        (result, batch_maps), device, generator = _run_batch(model, batch, t, device, generator, seed)
        out[sample, start : start + len(batch)] = result
        for name, values in batch_maps.items():
            maps[name][sample, start : start + len(batch)] = values
        done += len(batch)
        if progress is not None:
            progress(done, total)
    # (samples, X, Y, Z)
    return np.moveaxis(out[:, :, 0], 1, -1), {name: np.moveaxis(values[:, :, 0], 1, -1) for name, values in maps.items()}


def _reconstruct_whole_volume(model, volume, samples, t, device, generator, seed, progress, cancelled):
    """The volumetric path: each sample is the whole volume (1, 1, X, Y, Z) through the model."""
    whole = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    out = np.empty((samples, *volume.shape), dtype=np.float32)
    maps = {name: np.empty_like(out) for name in model.extra_maps}
    model.eval()
    for sample in range(samples):
        if cancelled is not None and cancelled():
            raise Cancelled("reconstruction cancelled")
        (result, sample_maps), device, generator = _run_batch(model, whole, t, device, generator, seed)
        out[sample] = result[0, 0]
        for name, values in sample_maps.items():
            maps[name][sample] = values[0, 0]
        if progress is not None:
            progress(sample + 1, samples)
    return out, maps


def _run_batch(model, batch, t, device, generator, seed):
    """One batch: its reconstructions and extra maps as numpy arrays; on GPU out-of-memory in
    halves, then on the CPU as a last resort."""
    step = len(batch)
    while True:
        try:
            model.to(device)
            parts = [model.reconstruct_with_maps(batch[start : start + step].to(device), t, generator)
                     for start in range(0, len(batch), step)]
            reconstruction = torch.cat([part[0].cpu() for part in parts]).numpy()
            maps = {name: torch.cat([part[1][name].cpu() for part in parts]).numpy() for name in model.extra_maps}
            return (reconstruction, maps), device, generator
        except torch.OutOfMemoryError:
            if device.type == "cpu":
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if step > 1:
                step //= 2
                warnings.warn(f"out of memory on {device}; retrying in batches of {step}", RuntimeWarning, stacklevel=3)
                continue
            warnings.warn(f"out of memory on {device}; continuing on the CPU (slower)", RuntimeWarning, stacklevel=3)
            device = torch.device("cpu")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
