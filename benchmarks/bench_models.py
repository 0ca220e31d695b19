"""Reconstruction time of every model kind, and pDDPM's batched patches against a per-patch loop.

Run by hand: ``.venv/bin/python benchmarks/bench_models.py [--device cuda] [--slices 50]``.
Prints a table; writes nothing. Default (untrained) configurations at the papers' slice size
96×96: speed does not depend on the weights. The pDDPM line sets its batched reconstruction
(all grid patches of all slices in chunks of 64 network inputs) against the straightforward
loop, one network call per patch per slice, on the same slices in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
from timing import best_time

from napari_brain_uad.models import MODEL_KINDS, build_model
from napari_brain_uad.reconstruct import reconstruct_volume


def per_patch_loop(model, slices: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """The reference pDDPM reconstruction: one network call for each patch of each slice."""
    masks = model.patch_masks(slices.shape[-2], slices.shape[-1], slices.device)
    noise = model.draw_noise(slices, generator)
    total, count = torch.zeros_like(slices), torch.zeros_like(slices)
    timesteps = torch.full((1,), t, dtype=torch.long, device=slices.device)
    with torch.no_grad():
        for index in range(len(slices)):
            for mask in masks:
                one = slices[index : index + 1]
                predicted = model.predict_patched(one, mask, timesteps, noise[index : index + 1])
                total[index] += (predicted * mask)[0]
                count[index] += mask
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=50, help="slices of the volume (the papers' 96×96×50)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")

    volume = np.random.default_rng(0).random((96, 96, args.slices), dtype=np.float32)
    print(f"\nreconstruction of a 96×96×{args.slices} volume, default configurations and batch size")
    print(f"{'kind':8} {'parameters':>12} {'1 sample':>10}")
    for kind in MODEL_KINDS:
        torch.manual_seed(0)
        model = build_model(kind).eval()
        parameters = sum(p.numel() for p in model.parameters())
        seconds = best_time(lambda: reconstruct_volume(model, volume, seed=0, device=device), args.repeats, sync)
        print(f"{kind:8} {parameters:>12,} {seconds:>9.2f}s")

    model = build_model("pddpm").to(device).eval()
    slices = torch.from_numpy(np.moveaxis(volume[:, :, :8], 2, 0)[:, None].copy()).to(device)
    generator = torch.Generator(device=device)
    batched = best_time(lambda: model.reconstruct(slices, generator=generator.manual_seed(0)), args.repeats, sync)
    looped = best_time(lambda: per_patch_loop(model, slices, 500, generator.manual_seed(0)), args.repeats, sync)
    same = torch.allclose(model.reconstruct(slices, generator=generator.manual_seed(0)),
                          per_patch_loop(model, slices, 500, generator.manual_seed(0)).clamp(0, 1), atol=1e-5)
    print(f"\npDDPM, 8 slices × {len(model.patch_masks(96, 96))} patches: batched {batched:.2f}s, "
          f"per-patch loop {looped:.2f}s ({looped / batched:.1f}× slower); same result: {same}")
    if not same:
        raise SystemExit("the batched pDDPM reconstruction differs from the per-patch loop")


if __name__ == "__main__":
    main()
