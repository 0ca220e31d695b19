"""Detection quality and cost of trained models on real lesions and on synthetic ones.

Run by hand:
    .venv/bin/python benchmarks/bench_detection.py --model runs/ixi-t1-ddpm/best.safetensors \\
        [--model other.safetensors ...] [--samples 10] [--ixi-test 4] [--json results.json]

Cases: the MSLUB patient 26 T1 with its expert lesion mask (real MS lesions, subtle on T1),
held-out healthy IXI T1 scans (subjects the training config excludes) with synthetic lesions:
three ellipsoids per scan, 4–9 mm radii, intensity scaled by 0.5 with a soft edge (dark, like
T1 lesions), placed at random (seeded) inside the brain, and the healthy IXI002 T1 from another
hospital and scanner (Guy's; the training scans are all Hammersmith's): no lesions, so only
false alarms can be counted there.

For each model, N reconstructions are made once per case; every scorer is computed from them;
maps are post-processed as in the papers (median 5³, eroded brain) and evaluated in model
space at 2 mm: [Dice] (best Dice over all thresholds, per case) and AUPRC (pooled over the
cases of a set), next to the learning-free baselines "intensity" (x) and "dark" (1 − x). For a
model with a stored healthy-percentile threshold for the scorer (``brain-uad-calibrate``), the
share of the eroded brain above it ("flagged", mean over cases): on healthy scans of the
training scanner it should be near 1 %, and a model robust to another scanner keeps it low on
IXI002 and on the MSLUB brain. Also printed: time per stage and the peak resident memory.
Nothing is written unless --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_brain_uad.evaluation import evaluate_filtered, flagged_fraction, pooled
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.model_card import default_scorer
from napari_brain_uad.models import load_model
from napari_brain_uad.postprocess import prepare
from napari_brain_uad.preprocess import to_model_space
from napari_brain_uad.reconstruct import reconstruct_volume, reconstruct_volume_with_maps
from napari_brain_uad.scoring import SCORERS, score
from napari_brain_uad.thresholds import default_threshold

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))
# Each model is also scored with its own default scorer (SADM's ssim+segmentation, ...); scorers
# that need maps a model does not make are skipped for it.
SCORERS_COMPARED = ("residual", "residual-dark", "ssim", "ssim-ens", "mhd-diag", "mhd-full")


def model_as_users_run_it(name_or_path: str | None):
    """A model (default: the bundled one) with the settings every door gives it on the CPU and
    its healthy-percentile threshold: (path, model, metadata, settings, threshold)."""
    from napari_brain_uad.analysis import AnalysisSettings
    from napari_brain_uad.model_registry import resolve_model

    model_path = resolve_model(name_or_path)
    model, metadata = load_model(model_path)
    settings = AnalysisSettings.for_model(metadata, device="cpu")
    threshold = default_threshold(metadata, settings.scorer)
    if threshold is None:
        raise SystemExit(f"{model_path}: no healthy-percentile threshold for {settings.scorer}; calibrate it first")
    return model_path, model, metadata, settings, threshold


def synthetic_lesions(scan, brain: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The scan with three dark ellipsoids inside the brain, and their mask (native grid)."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(scan.geometry.spacing)
    eroded = ndimage.binary_erosion(brain, iterations=int(np.ceil(12 / spacing.min())))
    candidates = np.argwhere(eroded)
    data = scan.data.astype(np.float32).copy()
    lesion = np.zeros(brain.shape, dtype=bool)
    grid = np.indices(brain.shape).reshape(3, -1).T
    for _ in range(3):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(4.0, 9.0, size=3)  # mm
        distance = np.sqrt((((grid - centre) * spacing / radii) ** 2).sum(axis=1)).reshape(brain.shape)
        weight = np.clip(1.5 - distance, 0.0, 1.0) * brain  # 1 inside, a soft 0.5-radius edge
        data *= 1.0 - 0.5 * weight
        lesion |= (distance <= 1.0) & brain
    return data, lesion


def ixi_subjects(which: str, model_path: str) -> list[str]:
    """Healthy IXI subjects the model never trained on: the training config's held-out test set,
    or the run's validation subjects (for choosing a model or a noise level without touching
    the test set)."""
    if which == "test":
        config = tomllib.loads((REPOSITORY / "training/configs/ixi-t1-ddpm-cpu.toml").read_text())
        return list(config["exclude_subjects"])
    from napari_brain_uad.checkpoint import read_metadata

    return [name.removesuffix("_T1") for name in read_metadata(model_path)["training_data"]["validation_subjects"]]


def cases(ixi_test: int, which: str, model_path: str, mslub: bool = True, other_scanner: bool = True):
    """(set name, case name, scan, brain mask or None, lesion mask) for every evaluated case."""
    if other_scanner:
        scan = read_nifti(DATA / "ixi002/T1.nii.gz")
        yield "IXI002 T1 healthy, other scanner", "IXI002", scan, read_nifti(DATA / "ixi002/T1_brainmask.nii.gz"), \
            np.zeros(scan.data.shape, dtype=bool)
    if mslub:
        folder = DATA / "mslub/patient26"
        yield "MSLUB T1", "patient26", read_nifti(folder / "T1.nii.gz"), None, read_nifti(folder / "lesionmask.nii.gz").data > 0
    for index, subject in enumerate(ixi_subjects(which, model_path)[:ixi_test]):
        scan = read_nifti(DATA / f"ixi_t1/{subject}_T1.nii.gz")
        mask = read_nifti(DATA / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz")
        data, lesion = synthetic_lesions(scan, mask.data > 0, seed=index)
        scan.data = data
        yield f"IXI {which} + synthetic", subject, scan, mask, lesion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint(s) to compare")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--ixi-test", type=int, default=4, help="held-out IXI subjects with synthetic lesions")
    parser.add_argument("--subjects", choices=("test", "validation"), default="test",
                        help="held-out test subjects (report) or the first model's validation subjects (choose)")
    parser.add_argument("--no-mslub", dest="mslub", action="store_false", help="leave out the MSLUB case")
    parser.add_argument("--no-other-scanner", dest="other_scanner", action="store_false",
                        help="leave out the healthy IXI002 scan from another scanner")
    parser.add_argument("--noise-levels", type=int, nargs="+", action="append",
                        help="noise level(s) for models with one (several: averaged); repeat to compare")
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS_COMPARED), choices=list(SCORERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}; N = {args.samples}")

    timings: dict[str, list[float]] = {}

    def timed(stage, function):
        start = time.perf_counter()
        result = function()
        timings.setdefault(stage, []).append(time.perf_counter() - start)
        return result

    results = []
    variants = []  # (path, model, metadata, noise levels): one run per level, one for a model without noise
    for model_path in args.model:
        model, metadata = load_model(model_path)
        for levels in (args.noise_levels if args.noise_levels and model.uses_noise_level else [None]):
            variants.append((model_path, model, metadata, levels))

    # Each case read (and given its synthetic lesions) once, then brought into each model space
    # the models ask for (with or without N4) once.
    case_list = list(cases(args.ixi_test, args.subjects, args.model[0], args.mslub, args.other_scanner))
    prepared_by_spec: dict = {}
    for spec in dict.fromkeys(model.spec for _, model, _, _ in variants):
        stage = "preprocess" + (f" ({spec.bias_correction})" if spec.bias_correction else "")
        prepared = prepared_by_spec[spec] = []
        for set_name, case_name, scan, mask, lesion in case_list:
            volume = timed(stage, lambda: to_model_space(scan, brain_mask=mask, spec=spec))
            truth = volume.transform.to_model(lesion.astype(np.float32), antialias=False) >= 0.5
            prepared.append((set_name, case_name, volume, truth & volume.brain_mask))

    for model_path, model, metadata, levels in variants:
        prepared = prepared_by_spec[model.spec]
        label = f"{metadata['kind']} ({Path(model_path).parent.name}/{Path(model_path).name})"
        if levels is not None:
            label += f" t={'+'.join(map(str, levels))}"
        t = None if levels is None else (levels[0] if len(levels) == 1 else list(levels))
        # Mahalanobis over N reconstructions needs them to differ; an autoencoder's never do.
        own = [default_scorer(metadata)] if default_scorer(metadata) not in args.scorers else []
        scorers = [name for name in [*args.scorers, *own]
                   if (not SCORERS[name].needs_samples or model.samples_differ)
                   and SCORERS[name].usable_with(model.extra_maps)]
        # The model's healthy-percentile threshold per scorer, where it has one: false alarms are counted at it.
        healthy_threshold = {name: default_threshold(metadata, name).value
                             for name in scorers if default_threshold(metadata, name)}
        per_set: dict[tuple[str, str], dict[str, list]] = {}
        for set_name, case_name, volume, truth in prepared:
            image, brain = volume.image, volume.brain_mask
            one, model_maps = timed(f"{label}: reconstruct x1", lambda: reconstruct_volume_with_maps(
                model, image, samples=1, seed=0, t=t, device=args.device))
            model_maps = {name: values[0] for name, values in model_maps.items()}
            many = None
            if any(SCORERS[name].needs_samples for name in scorers):
                many = timed(f"{label}: reconstruct x{args.samples}",
                             lambda: reconstruct_volume(model, image, samples=args.samples, seed=1, t=t,
                                                        device=args.device))
            maps = {"intensity": image, "dark": np.where(brain, 1.0 - image, 0.0).astype(np.float32)}
            for name in scorers:
                other = many if SCORERS[name].needs_samples else one[0]
                maps[name] = timed(name, lambda: np.asarray(score(name, image, other, brain, maps=model_maps),
                                                            dtype=np.float32))
            for name, score_map in maps.items():
                filtered = timed("post-process", lambda: prepare(score_map, brain))
                entry = per_set.setdefault((set_name, name), {"cases": [], "flagged": []})
                if truth.any():
                    entry["cases"].append(evaluate_filtered(filtered, truth, name=case_name))
                if name in healthy_threshold:
                    entry["flagged"].append(flagged_fraction(filtered, healthy_threshold[name]))
            print(f"  {label}: {set_name} {case_name} done", flush=True)
        for (set_name, name), entry in per_set.items():
            lesions = entry["cases"]
            if not lesions and not entry["flagged"]:
                continue  # a healthy set, and no healthy threshold to count false alarms at
            results.append({
                "model": label, "set": set_name, "scorer": name,
                "best_dice_mean": float(np.mean([case.best_dice for case in lesions])) if lesions else None,
                "auprc_pooled": pooled(lesions)["auprc"] if lesions else None,
                "flagged_at_healthy_threshold": float(np.mean(entry["flagged"])) if entry["flagged"] else None,
                "cases": len(lesions) if lesions else len(entry["flagged"]),
            })

    def cell(value, form):
        return "–" if value is None else format(value, form)

    print("\n| model | set | scorer | [Dice] (mean over cases) | AUPRC (pooled) | flagged at healthy threshold |"
          "\n|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['set']} ({row['cases']}) | {row['scorer']} | "
              f"{cell(row['best_dice_mean'], '.3f')} | {cell(row['auprc_pooled'], '.3f')} | "
              f"{cell(row['flagged_at_healthy_threshold'], '.1%')} |")
    print("\n| stage | mean time per volume |\n|---|---|")
    for stage, values in timings.items():
        print(f"| {stage} | {np.mean(values):.2f} s |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory: {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "timings": timings, "peak_mb": peak_mb}, indent=2))


if __name__ == "__main__":
    main()
