"""The threshold path on a 96 x 96 x 50 model-space volume: what a slider move in the widget costs.

    python benchmarks/bench_threshold.py [--repeats 3] [--thresholds 200]
    NAPARI_BRAIN_UAD_DATA=../shared/data python benchmarks/bench_threshold.py --real

Times ``prepare`` (median 5 x 5 x 5 + erosion, once per map) and ``FilteredMap.mask_at``
(threshold + 26-connected components, per threshold) averaged over many thresholds spread over
the score range; also ``findings`` (the table) for comparison. ``--real``: the map a slider
thresholds in the widget, on MSLUB patient 26's 1 mm grid (182 × 218 × 182, the bundled
model), at the thresholds a reader moves through (0.5–5 % of the brain above, and the model's
healthy threshold), against labelling the brain's box at each (the reference, measured in the
same run). Prints only; writes no files.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from scipy import ndimage
from timing import best_time

from napari_brain_uad.postprocess import prepare

SHAPE = (96, 96, 50)


def synthetic_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal brain and a smooth noisy map with a few bright blobs: components of all
    sizes at every threshold, like a real residual map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    brain = ((grid / np.array([0.85, 0.9, 0.9])[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
    score_map = ndimage.gaussian_filter(rng.random(SHAPE, dtype=np.float32), 1.0)
    for _ in range(6):
        centre = rng.uniform(-0.5, 0.5, size=3)
        radius = rng.uniform(0.05, 0.15)
        blob = ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= radius**2
        score_map[blob] += 0.3
    return score_map * brain, brain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of prepare; the fastest counts")
    parser.add_argument("--thresholds", type=int, default=200, help="thresholds for the mask_at mean")
    parser.add_argument("--real", action="store_true", help="a real 1 mm map instead (see above)")
    args = parser.parse_args()
    if args.real:
        return real_map()

    score_map, brain = synthetic_case()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"CPUs: {os.cpu_count()} (usable by this process: {usable}); numpy {np.__version__}")
    print(f"volume {SHAPE}, {int(brain.sum())} brain voxels")

    prepare_s = best_time(lambda: prepare(score_map, brain), args.repeats)
    plain_s = best_time(lambda: prepare(score_map, brain, median=False), args.repeats)
    filtered = prepare(score_map, brain)
    low, high = filtered.score_range()
    thresholds = np.linspace(low, high, args.thresholds + 2)[1:-1]
    filtered.mask_at(thresholds[0])  # first call outside the timing
    start = time.perf_counter()
    kept = [int(filtered.mask_at(t).sum()) for t in thresholds]
    mask_s = (time.perf_counter() - start) / thresholds.size
    start = time.perf_counter()
    for t in thresholds[:: max(1, thresholds.size // 20)]:
        filtered.findings(t)
    findings_s = (time.perf_counter() - start) / thresholds[:: max(1, thresholds.size // 20)].size

    print(f"prepare (median 5x5x5 + erosion, once per map): {prepare_s * 1e3:8.1f} ms (best of {args.repeats})")
    print(f"prepare without median:                         {plain_s * 1e3:8.1f} ms")
    print(
        f"mask_at (threshold + components, per threshold): {mask_s * 1e3:8.2f} ms "
        f"(mean over {thresholds.size} thresholds; {min(kept)}-{max(kept)} voxels kept)"
    )
    print(f"findings table (per threshold):                  {findings_s * 1e3:8.2f} ms")


def real_map() -> None:
    """mask_at on a real native-grid map, against labelling the whole volume at each threshold."""
    from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
    from napari_brain_uad.scan_reader import read_scan
    from napari_brain_uad.model_registry import resolve_model
    from napari_brain_uad.models import load_model
    from napari_brain_uad.postprocess import remove_small_components
    from napari_brain_uad.thresholds import default_threshold

    data = os.environ.get("NAPARI_BRAIN_UAD_DATA", "../shared/data")
    scan = read_scan(os.path.join(data, "mslub/patient26/T1.nii.gz"))
    model, metadata = load_model(resolve_model(None))
    analysis = analyse_scan(scan, model, settings=AnalysisSettings.for_model(metadata, device="cpu"))
    filtered = analysis.filtered
    scores = filtered.scores()
    # float64, as mask_at compares (a Python float would be rounded to the map's float32)
    thresholds = [np.float64(np.percentile(scores, q)) for q in np.linspace(95, 99.5, 10)]
    healthy = default_threshold(metadata, analysis.settings.scorer)
    if healthy is not None:
        thresholds.append(np.float64(healthy.value))
    size = filtered._max_dropped(0, analysis.default_min_size_ml)
    box = ndimage.find_objects(filtered.region.astype(np.uint8))[0]

    def labelling_the_box(threshold):
        """The reference: every voxel of the brain's box labelled at each threshold (the way
        before graphs of the voxels above), small components dropped."""
        mask = np.zeros(filtered.shape, bool)
        mask[box] = remove_small_components((filtered.values[box] > threshold) & filtered.region[box], size)
        return mask

    ours = [best_time(lambda t=t: filtered.mask_at(t, min_size_ml=analysis.default_min_size_ml), 5) for t in thresholds]
    reference = [best_time(lambda t=t: labelling_the_box(t), 5) for t in thresholds]
    for t in thresholds:
        assert np.array_equal(filtered.mask_at(t, min_size_ml=analysis.default_min_size_ml), labelling_the_box(t))
    print(f"real map {filtered.shape}, {int(filtered.region.sum())} voxels in the region; "
          f"{len(thresholds)} thresholds ({100 * np.mean(scores > thresholds[-1]):.1f}–"
          f"{100 * np.mean(scores > thresholds[0]):.1f} % of the region above)")
    print(f"mask_at: median {1e3 * float(np.median(ours)):.1f} ms; labelling the brain's box: median "
          f"{1e3 * float(np.median(reference)):.1f} ms; ratio {float(np.median(reference)) / float(np.median(ours)):.1f}×")


if __name__ == "__main__":
    main()
