"""``brain-uad-calibrate``: give a trained checkpoint its thresholds and card, ready to ship.

    brain-uad-calibrate --model runs/ixi-t1-ddpm/best.safetensors --output ixi-t1-ddpm.safetensors \\
        --scorer ssim-ens --lesion-image mslub/patient26/T1.nii.gz --lesion-mask mslub/patient26/lesionmask.nii.gz

Thresholds are calibrated exactly as users will apply them: each scan goes through
``napari_brain_uad.analysis.analyse_scan`` (the widget's and ``brain-uad score``'s pipeline) with
the settings stored beside the threshold, and the threshold is on the post-processed map
(median 5³, eroded brain) on the scan's own grid.

- ``healthy-<P>``: the P-th percentile (default 99) of the scores inside the brain over healthy
  scans the model never trained on: by default the run's validation subjects, read from the
  checkpoint and its training settings. About (100 − P) % of healthy brain voxels exceed it.
- ``<name>-dice``: the threshold with the best Dice on scans with lesion masks (``--lesion-image``
  / ``--lesion-mask``, repeated), searched greedily as the thesis does; optimistic by design
  (tuned on the cases it is scored on), and stated so in the card.

The output checkpoint has the input's weights, its metadata plus ``default_scorer``,
``thresholds``, ``calibration`` and, when given, ``results``, ``limits`` and
``training_command``; machine-specific paths in the training settings are replaced by the
names of the folders, so a shipped card does not carry the trainer's file system.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_brain_uad.io import read_nifti
from napari_brain_uad.metrics import dice
from napari_brain_uad.models import build_model, load_model
from napari_brain_uad.postprocess import greedy_dice_threshold, healthy_percentile_threshold, min_size_in_voxels
from napari_brain_uad.scoring import SCORERS

from .data import TrainingDataError, find_scans

PATH_SETTINGS = ("data", "brain_masks", "output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad-calibrate", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True, help="trained checkpoint (e.g. runs/NAME/best.safetensors)")
    parser.add_argument("--output", required=True, help="calibrated checkpoint to write (.safetensors)")
    parser.add_argument("--scorer", default="ssim-ens", choices=list(SCORERS), help="the model's default scorer")
    parser.add_argument("--samples", type=int, help="reconstructions per scan (default 1; 10 for MHD scorers)")
    parser.add_argument("--t-test", type=int,
                        help="store this test-time noise level in the model (diffusion kinds), e.g. the best on validation")
    parser.add_argument("--percentile", type=float, default=99.0, help="healthy-percentile threshold (default 99)")
    parser.add_argument("--healthy", nargs="+",
                        help="healthy scans (folder, CSV or files) instead of the run's validation subjects")
    parser.add_argument("--healthy-brain-masks", help="brain-mask folder for --healthy")
    parser.add_argument("--max-healthy", type=int, default=None, help="use at most this many healthy scans")
    parser.add_argument("--lesion-image", action="append", default=[], help="scan with lesions (repeat)")
    parser.add_argument("--lesion-mask", action="append", default=[], help="its lesion mask (repeat, same order)")
    parser.add_argument("--lesion-brain-mask", action="append", default=[],
                        help="its brain mask, or 'none' for a skull-stripped scan (repeat, same order)")
    parser.add_argument("--lesion-name", default="lesion", help="name of the Dice threshold: <name>-dice")
    parser.add_argument("--results", help="JSON of measured results to put in the card (e.g. from bench_detection)")
    parser.add_argument("--limits", action="append", default=[], help="a limit of the model, for the card (repeat)")
    parser.add_argument("--training-command", help="the command that trained the model, for the card")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        calibrate(arguments)
    except (CheckpointError, TrainingDataError, ValueError) as error:
        print(f"brain-uad-calibrate: error: {error}", file=sys.stderr)
        return 2
    except FileExistsError as error:
        print(f"brain-uad-calibrate: error: {error} (use --overwrite to replace it)", file=sys.stderr)
        return 2
    return 0


def calibrate(arguments) -> Path:
    output = Path(arguments.output)
    if output.exists() and not arguments.overwrite:
        raise FileExistsError(f"{output}: already exists; not overwriting it")
    if len(arguments.lesion_mask) != len(arguments.lesion_image):
        raise ValueError(f"{len(arguments.lesion_image)} --lesion-image but {len(arguments.lesion_mask)} --lesion-mask")
    if arguments.lesion_brain_mask and len(arguments.lesion_brain_mask) != len(arguments.lesion_image):
        raise ValueError("give one --lesion-brain-mask per --lesion-image (or 'none'), or none at all")
    model, metadata = load_model(arguments.model)
    state, _ = load_checkpoint(arguments.model)
    if arguments.t_test is not None:
        if not model.uses_noise_level:
            raise ValueError(f"--t-test: a {metadata['kind']} model has no noise level")
        metadata["hyperparameters"] = {**metadata["hyperparameters"], "t_test": arguments.t_test}
        rebuilt = build_model(metadata["kind"], metadata["hyperparameters"], model.spec)
        rebuilt.load_state_dict(state)
        model = rebuilt.eval()
    scorer = arguments.scorer
    samples = arguments.samples or (10 if SCORERS[scorer].needs == "samples" else 1)
    settings = AnalysisSettings(scorer=scorer, samples=samples, device=arguments.device, seed=0)
    stored_settings = {"scorer": scorer, "samples": samples, "noise_levels": None, "median": settings.median, "seed": 0}
    say = (lambda text: None) if arguments.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    healthy = _healthy_scans(arguments, metadata)
    healthy_maps = []
    for index, pair in enumerate(healthy):
        say(f"healthy {index + 1}/{len(healthy)}: {pair.subject}")
        scan = read_nifti(pair.image)
        brain = read_nifti(pair.brain_mask, allow_empty=True) if pair.brain_mask else None
        healthy_maps.append(analyse_scan(scan, model, brain_mask=brain, settings=settings).filtered)
    percentile_name = f"healthy-{arguments.percentile:g}"
    value, record = healthy_percentile_threshold(healthy_maps, percentile=arguments.percentile)
    record["subjects"] = [pair.subject for pair in healthy]
    thresholds: dict[str, Any] = {percentile_name: {"value": value, **stored_settings, **record}}

    lesion_results = []
    if arguments.lesion_image:
        analyses, maps, truths, sizes = [], [], [], []
        brains = arguments.lesion_brain_mask or ["none"] * len(arguments.lesion_image)
        for image, mask, brain_path in zip(arguments.lesion_image, arguments.lesion_mask, brains):
            say(f"lesion case: {image}")
            scan = read_nifti(image)
            truth = read_nifti(mask, allow_empty=True)
            if truth.data.shape != scan.data.shape:
                raise ValueError(f"{mask}: its grid {truth.data.shape} is not the scan's {scan.data.shape}")
            brain = None if brain_path.lower() == "none" else read_nifti(brain_path, allow_empty=True)
            analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings)
            analyses.append(analysis)
            maps.append(analysis.filtered)
            truths.append(truth.data > 0)
            sizes.append(min_size_in_voxels(analysis.default_min_size_ml, analysis.filtered.spacing_mm))
        value, record = greedy_dice_threshold(maps, truths, min_size_voxels=float(np.max(sizes)))
        record["cases"] = [str(image) for image in arguments.lesion_image]
        record["note"] = "tuned on the cases it is scored on: an optimistic upper bound, not a held-out result"
        thresholds[f"{arguments.lesion_name}-dice"] = {"value": value, **stored_settings, **record}
        for name, entry in thresholds.items():
            dices = [dice(analysis.mask_at(entry["value"]), truth & analysis.filtered.region)
                     for analysis, truth in zip(analyses, truths)]
            lesion_results.append({"threshold": name, "dice_per_case": dices, "mean_dice": float(np.mean(dices))})

    card = {key: value for key, value in metadata.items() if key != "format_version"}
    card["training"] = {**card.get("training", {}), "settings": _portable(card.get("training", {}).get("settings", {}))}
    card["default_scorer"] = scorer
    card["thresholds"] = thresholds
    card["calibration"] = {"settings": stored_settings, "source_checkpoint": Path(arguments.model).name,
                           "dice_at_thresholds": lesion_results}
    if arguments.results:
        card["results"] = json.loads(Path(arguments.results).read_text())
    if arguments.limits:
        card["limits"] = list(arguments.limits)
    if arguments.training_command:
        card["training_command"] = arguments.training_command
    save_checkpoint(output, state, card, overwrite=arguments.overwrite)
    say(json.dumps({"thresholds": {name: entry["value"] for name, entry in thresholds.items()},
                    "dice_at_thresholds": lesion_results}, indent=1))
    return output


def _healthy_scans(arguments, metadata):
    if arguments.healthy:
        data = arguments.healthy[0] if len(arguments.healthy) == 1 else arguments.healthy
        scans = find_scans(data, arguments.healthy_brain_masks)
    else:
        settings = metadata.get("training", {}).get("settings", {})
        subjects = metadata.get("training_data", {}).get("validation_subjects") or []
        if not subjects or not settings.get("data"):
            raise ValueError(f"{arguments.model}: it names no validation subjects and data folder; give --healthy")
        every = find_scans(settings["data"], settings.get("brain_masks"))
        scans = [pair for pair in every if pair.subject in set(subjects)]
        if len(scans) != len(subjects):
            raise ValueError(f"only {len(scans)} of the {len(subjects)} validation subjects were found in {settings['data']}")
    return scans[: arguments.max_healthy] if arguments.max_healthy else scans


def _portable(settings: dict) -> dict:
    """Training settings without the trainer's absolute paths (folder names only)."""
    return {key: (Path(value).name if key in PATH_SETTINGS and isinstance(value, str) else value)
            for key, value in settings.items()}


if __name__ == "__main__":
    sys.exit(main())
