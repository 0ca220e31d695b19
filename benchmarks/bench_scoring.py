"""Speed of the anomaly scorers on one model-space volume (96 × 96 × 50), on this machine.

Run by hand: ``.venv/bin/python benchmarks/bench_scoring.py [--device cuda]``. Prints a table;
writes nothing. Each fast path is set against a reference measured in the same run:

- SSIM-ens (8 window spreads, 3D) against skimage's structural_similarity called per spread
  (skimage computes in float32 for these float32 inputs; the scorers work in float64);
- MHD-full with N = 10 (Woodbury, all slices in one batch) against the reference method, the
  dense P×P inverse, on one 64×64 slice with 10 samples (P = 4096); the Woodbury version must
  be at least 100× faster there. The dense method on the whole volume is not run (about a
  minute or more here); its per-slice time times the slice count is printed as an estimate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch
from timing import best_time
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_brain_uad import scoring

TARGET_RATIO = 100.0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_case(shape, n_samples: int, seed: int = 0):
    """A smooth volume, a lesion-like bright blob, and N correlated-noise reconstructions."""
    rng = np.random.default_rng(seed)
    healthy = ndimage.gaussian_filter(rng.random(shape), 2.0)
    healthy = (healthy - healthy.min()) / (healthy.max() - healthy.min())
    image = healthy.copy()
    image[40:50, 40:50, ...] += 0.4
    noise = rng.standard_normal((n_samples, *shape))
    samples = healthy[None] + 0.05 * ndimage.gaussian_filter(noise, 1.5, axes=(1, 2))
    return image.astype(np.float32), samples.astype(np.float32)


def dense_mahalanobis_slice(image: np.ndarray, samples: np.ndarray, reg: float) -> np.ndarray:
    """The reference method on one slice: invert the dense regularised P×P covariance."""
    pixels = samples.reshape(samples.shape[0], -1).astype(np.float64)
    d = image.reshape(-1).astype(np.float64) - pixels.mean(axis=0)
    covariance = np.cov(pixels, rowvar=False) + reg * np.eye(pixels.shape[1])
    return np.sqrt(np.maximum(0, d * (np.linalg.inv(covariance) @ d))).reshape(image.shape)


def skimage_ssim_ens(image: np.ndarray, reference: np.ndarray, data_range: float) -> np.ndarray:
    maps = np.stack(
        [
            structural_similarity(
                image, reference, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                data_range=data_range, full=True,
            )[1]
            for sigma in scoring.SSIM_ENS_SIGMAS
        ]
    )
    weights = np.exp(-maps) / np.exp(-maps).sum(axis=0)
    return 1 - (weights * maps).sum(axis=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device for the scorers (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"machine: {cpu_name()}; os.cpu_count() = {os.cpu_count()}; torch threads = {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}; scorers on {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print()

    shape, n_samples, reg = (96, 96, 50), 10, 1e-2
    image, samples = make_case(shape, n_samples)
    reconstruction = samples.mean(axis=0)
    image_t = torch.from_numpy(image).to(device)
    samples_t = torch.from_numpy(samples).to(device)
    reconstruction_t = torch.from_numpy(reconstruction).to(device)
    data_range = float(image.max() - image.min())

    rows = []  # (what, seconds, reference seconds or None)
    ssim_ens_s = best_time(lambda: scoring.ssim_ens(image_t, reconstruction_t), args.repeats, sync)
    skimage_s = best_time(lambda: skimage_ssim_ens(image, reconstruction, data_range), 1)
    rows.append((f"ssim-ens, 8 sigmas, 3D {shape}", ssim_ens_s, ("skimage, per sigma", skimage_s)))
    ssim_s = best_time(lambda: scoring.ssim_map(image_t, reconstruction_t), args.repeats, sync)
    rows.append((f"ssim, sigma 1, 3D {shape}", ssim_s, None))
    mhd_full_s = best_time(
        lambda: scoring.mahalanobis(image_t, samples_t, covariance="full", reg=reg), args.repeats, sync
    )
    mhd_diag_s = best_time(
        lambda: scoring.mahalanobis(image_t, samples_t, covariance="diag", reg=reg), args.repeats, sync
    )
    mhd_ssim_s = best_time(lambda: scoring.mhd_ssim(image_t, samples_t, reg=reg), args.repeats, sync)

    # One 64×64 slice with 10 samples: dense P×P inverse (P = 4096) against Woodbury.
    slice_image = image[16:80, 16:80, 25]
    slice_samples = samples[:, 16:80, 16:80, 25]
    slice_image_t = torch.from_numpy(np.ascontiguousarray(slice_image)).to(device)
    slice_samples_t = torch.from_numpy(np.ascontiguousarray(slice_samples)).to(device)
    dense_s = best_time(lambda: dense_mahalanobis_slice(slice_image, slice_samples, reg), 2)
    woodbury_s = best_time(
        lambda: scoring.mahalanobis(slice_image_t, slice_samples_t, reg=reg, smooth_sigma=0),
        max(args.repeats, 20),
        sync,
    )
    dense = dense_mahalanobis_slice(slice_image, slice_samples, reg)
    woodbury = scoring.mahalanobis(slice_image, slice_samples, reg=reg, smooth_sigma=0)
    max_error = float(np.abs(woodbury - dense).max() / dense.max())

    rows.append((f"mhd-full, N={n_samples}, {shape}", mhd_full_s, ("dense, est. ×50 slices", dense_s * shape[2])))
    rows.append((f"mhd-diag, N={n_samples}, {shape}", mhd_diag_s, None))
    rows.append((f"mhd-full-ssim, N={n_samples}, {shape}", mhd_ssim_s, None))
    rows.append(("mhd-full, N=10, one 64×64 slice", woodbury_s, ("dense P×P inverse", dense_s)))

    print(f"{'what':<40} {'time':>10}   {'reference':<24} {'ref. time':>10} {'speed-up':>9}")
    print("-" * 100)
    for what, seconds, reference in rows:
        line = f"{what:<40} {seconds * 1e3:>8.1f}ms"
        if reference is not None:
            name, ref_seconds = reference
            ratio = ref_seconds / seconds
            line += f"   {name:<24} {ref_seconds * 1e3:>8.0f}ms {ratio:>8.{1 if ratio < 10 else 0}f}×"
        print(line)
    print()
    ratio = dense_s / woodbury_s
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(
        f"Woodbury vs dense inverse on one 64×64 slice, N=10: {ratio:.0f}× faster ({verdict} the "
        f"{TARGET_RATIO:.0f}× target); max |difference| = {max_error:.1e} of the maximum score"
    )
    return 0 if ratio >= TARGET_RATIO and max_error <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
