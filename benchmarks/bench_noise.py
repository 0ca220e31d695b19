"""Speed of batched simplex noise (AnoDDPM defaults: 6 octaves, persistence 0.8, frequency 64).

Run by hand: ``.venv/bin/python benchmarks/bench_noise.py [--device cuda] [--reference-octaves N]``.
Prints a table; writes nothing. The vectorised ``simplex_noise_2d`` on a batch of 32 fields of
96×96 is set against the per-pixel pure-Python reference on one 96×96 field with the same
number of octaves (6 by default; pass fewer if that is too slow, the printed ratio then says
how many octaves the reference ran and scales its time linearly to 6, which is honest because
the reference's cost is exactly proportional to the octave count). Both are measured in this run.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from timing import best_time

from napari_brain_uad.noise import draw_simplex_tables, per_pixel_reference_simplex, simplex_noise_2d

BATCH, SIZE, OCTAVES = 32, 96, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-octaves", type=int, default=OCTAVES)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"machine: {platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs), "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print("device: cpu")

    batch_time = best_time(
        lambda: simplex_noise_2d((BATCH, SIZE, SIZE), octaves=OCTAVES, generator=0, device=device),
        args.repeats, sync,
    )
    single_time = best_time(
        lambda: simplex_noise_2d((1, SIZE, SIZE), octaves=OCTAVES, generator=0, device=device),
        args.repeats, sync,
    )
    tables = draw_simplex_tables(1, args.reference_octaves, generator=0)
    # The reference is slow and steady: one timed call after a warm-up is enough.
    reference_time = best_time(lambda: per_pixel_reference_simplex(tables, SIZE, SIZE), 1)
    reference_per_field = reference_time * OCTAVES / args.reference_octaves
    vectorised_per_field = batch_time / BATCH

    print(f"vectorised, {BATCH} fields {SIZE}x{SIZE}, {OCTAVES} octaves: {batch_time * 1e3:9.2f} ms "
          f"({vectorised_per_field * 1e3:.3f} ms per field)")
    print(f"vectorised, 1 field {SIZE}x{SIZE}, {OCTAVES} octaves:   {single_time * 1e3:9.2f} ms")
    scaled = "" if args.reference_octaves == OCTAVES else f", scaled x{OCTAVES}/{args.reference_octaves} to {OCTAVES} octaves"
    print(f"per-pixel reference, 1 field, {args.reference_octaves} octaves: {reference_time * 1e3:9.2f} ms "
          f"({reference_per_field * 1e3:.2f} ms per {OCTAVES}-octave field{scaled})")
    print(f"speed-up per field (reference / vectorised batch): {reference_per_field / vectorised_per_field:,.0f}x")
    print(f"speed-up single field (reference / vectorised 1 field): {reference_per_field / single_time:,.0f}x")


if __name__ == "__main__":
    main()
