"""How thick can a scan's slices be before a model's findings stop making sense?

Run by hand:
    .venv/bin/python benchmarks/bench_slice_thickness.py [--model NAME|PATH] [--subjects 4] \\
        [--thickness 2 3 4 6] [--json results.json]

Clinical 2D acquisitions have 0.7 x 0.7 mm pixels but 3-6 mm slices; the models work at 2 mm
isotropic. This simulates such acquisitions from held-out healthy IXI T1 scans (2 mm, the
training config's test subjects): the scan is averaged over k consecutive axial slices (a thick
slice integrates the tissue across it), its affine made k times coarser along that axis, and
the brain mask taken where at least half of the thick slice is brain. Each scan is analysed as a
user's would be (``analysis.analyse_scan``, the model's default scorer and settings):

- healthy, to count false alarms: the share of the evaluated brain above the model's
  healthy-percentile threshold (about 1 % at 2 mm by construction);
- with three synthetic dark lesions (as in ``bench_detection``: 4-9 mm radii, intensity halved),
  inserted on the 2 mm grid before thickening: [Dice] and AUPRC against the lesions as they
  stand on the thick grid (voxels at least half lesion).

The 2 mm rows are the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench_detection import DATA, ixi_subjects, model_as_users_run_it, synthetic_lesions
from napari_brain_uad.analysis import analyse_scan
from napari_brain_uad.evaluation import evaluate_analysis, flagged_fraction, pooled
from napari_brain_uad.nifti import NiftiGeometry, NiftiVolume, read_nifti


def axial_axis(geometry: NiftiGeometry) -> int:
    """The source axis that runs inferior-superior (the one thick axial slices are thick along)."""
    return int(np.argmax(np.abs(geometry.affine[2, :3])))


def thicken(volume: np.ndarray, axis: int, factor: int, *, mean: bool = True) -> np.ndarray:
    """Average (or, for masks, take the majority of) ``factor`` consecutive slices along ``axis``;
    a last incomplete group is dropped."""
    count = volume.shape[axis] // factor
    trimmed = np.take(volume, np.arange(count * factor), axis=axis).astype(np.float32)
    shape = list(trimmed.shape)
    shape[axis:axis + 1] = [count, factor]
    grouped = trimmed.reshape(shape).mean(axis=axis + 1)
    return grouped if mean else grouped >= 0.5


def thick_geometry(geometry: NiftiGeometry, axis: int, factor: int, shape) -> NiftiGeometry:
    """The grid of the thickened scan: voxel i along ``axis`` covers native voxels
    factor·i … factor·i + factor − 1, so its centre sits (factor − 1)/2 voxels further on."""
    scale = np.eye(4)
    scale[axis, axis] = factor
    scale[axis, 3] = 0.5 * (factor - 1)
    affine = geometry.affine @ scale
    header = geometry.header.copy()
    header.set_data_shape(shape)
    header.set_qform(affine, 1)
    header.set_sform(affine, 1)
    return NiftiGeometry(source=f"{geometry.source} ({factor}x thicker slices)", affine=affine,
                         shape=tuple(shape), header=header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model name or checkpoint (default: the bundled default)")
    parser.add_argument("--subjects", type=int, default=4, help="held-out IXI subjects")
    parser.add_argument("--thickness", type=float, nargs="+", default=[2.0, 4.0, 6.0],
                        help="slice thicknesses in mm (multiples of the scans' 2 mm)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    model_path, model, metadata, settings, threshold = model_as_users_run_it(args.model)
    print(f"machine: {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model {model_path.name}, scorer {settings.scorer}, "
          f"threshold {threshold.name} = {threshold.value:.4g}")

    rows = []
    subjects = ixi_subjects("test", str(model_path))[: args.subjects]
    for thickness in args.thickness:
        flagged, cases, seconds = [], [], []
        for index, subject in enumerate(subjects):
            scan = read_nifti(DATA / f"ixi_t1/{subject}_T1.nii.gz")
            brain = read_nifti(DATA / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz").data > 0
            axis = axial_axis(scan.geometry)
            native_mm = scan.geometry.spacing[axis]
            factor = int(round(thickness / native_mm))
            if factor < 1 or abs(factor * native_mm - thickness) > 1e-3:
                raise SystemExit(f"{thickness} mm is not a multiple of the scans' {native_mm} mm slices")
            lesioned, lesion = synthetic_lesions(scan, brain, seed=index)
            thick_brain = thicken(brain, axis, factor, mean=False)
            geometry = thick_geometry(scan.geometry, axis, factor, thick_brain.shape)
            for data, truth in ((scan.data, None), (lesioned, lesion)):
                volume = NiftiVolume(thicken(data, axis, factor), geometry)
                start = time.perf_counter()
                analysis = analyse_scan(volume, model, brain_mask=thick_brain, settings=settings)
                seconds.append(time.perf_counter() - start)
                if truth is None:
                    flagged.append(flagged_fraction(analysis.filtered, threshold.value))
                else:
                    cases.append(evaluate_analysis(analysis, thicken(truth, axis, factor, mean=False)))
            print(f"  {thickness:g} mm: {subject} done", flush=True)
        rows.append({
            "thickness_mm": thickness,
            "flagged_healthy": float(np.mean(flagged)),
            "flagged_healthy_max": float(np.max(flagged)),
            "best_dice_mean": float(np.mean([case.best_dice for case in cases])),
            "auprc_pooled": pooled(cases)["auprc"],
            "seconds_per_scan": float(np.mean(seconds)),
            "subjects": len(subjects),
        })

    print("\n| slice thickness | flagged, healthy (mean / max) | [Dice], synthetic lesions | AUPRC (pooled) | s per scan |"
          "\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['thickness_mm']:g} mm | {row['flagged_healthy']:.1%} / {row['flagged_healthy_max']:.1%} | "
              f"{row['best_dice_mean']:.3f} | {row['auprc_pooled']:.3f} | {row['seconds_per_scan']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_path.name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
