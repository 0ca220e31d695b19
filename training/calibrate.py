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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_brain_uad.analysis import AnalysisSettings
from napari_brain_uad.checkpoint import load_checkpoint, save_checkpoint
from napari_brain_uad.errors import BrainUADError, OutputExists, SettingsError, internal_error_message
from napari_brain_uad.evaluation import LabelledCase, analyse_cases, evaluate_analysis
from napari_brain_uad.models import build_model, load_model
from napari_brain_uad.postprocess import min_size_in_voxels
from napari_brain_uad.scoring import SCORERS
from napari_brain_uad.thresholds import (
    HEALTHY_PERCENTILE,
    dice_threshold_name,
    greedy_dice_threshold,
    healthy_percentile_threshold,
    healthy_threshold_name,
    stored_entry,
)

from .data import find_scans

PATH_SETTINGS = ("data", "brain_masks", "output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad-calibrate", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True, help="trained checkpoint (e.g. runs/NAME/best.safetensors)")
    parser.add_argument("--output", required=True, help="calibrated checkpoint to write (.safetensors)")
    parser.add_argument("--scorer", choices=list(SCORERS),
                        help="the model's default scorer (default: the checkpoint's, else ssim-ens)")
    parser.add_argument("--samples", type=int, help="reconstructions per scan (default 1; 10 for MHD scorers)")
    parser.add_argument("--t-test", type=int,
                        help="store this test-time noise level in the model (diffusion kinds), e.g. the best on validation")
    parser.add_argument("--percentile", type=float, default=HEALTHY_PERCENTILE,
                        help=f"healthy-percentile threshold (default {HEALTHY_PERCENTILE:g})")
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
    say = (lambda text: None) if arguments.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        lesion_cases = _lesion_cases(arguments.lesion_image, arguments.lesion_mask, arguments.lesion_brain_mask)
        healthy = healthy_cases(arguments.model, arguments.healthy, arguments.healthy_brain_masks,
                                limit=arguments.max_healthy)
        calibrate(
            arguments.model, arguments.output, scorer=arguments.scorer, samples=arguments.samples,
            t_test=arguments.t_test, percentile=arguments.percentile, healthy=healthy, lesion_cases=lesion_cases,
            lesion_name=arguments.lesion_name,
            results=json.loads(Path(arguments.results).read_text()) if arguments.results else None,
            limits=arguments.limits, training_command=arguments.training_command, device=arguments.device,
            overwrite=arguments.overwrite, say=say,
        )
    except OutputExists as error:
        print(f"brain-uad-calibrate: error: {error} (use --overwrite to replace it)", file=sys.stderr)
        return 2
    except BrainUADError as error:
        print(f"brain-uad-calibrate: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: traceback to the log, one plain line to the user
        print(f"brain-uad-calibrate: {internal_error_message(error, 'brain-uad-calibrate')}", file=sys.stderr)
        return 1
    return 0


def calibrate(
    model_path: str | Path,
    output: str | Path,
    *,
    healthy: Sequence[LabelledCase],
    lesion_cases: Sequence[LabelledCase] = (),
    scorer: str | None = None,
    samples: int | None = None,
    t_test: int | None = None,
    percentile: float = HEALTHY_PERCENTILE,
    lesion_name: str = "lesion",
    results: dict | None = None,
    limits: Sequence[str] = (),
    training_command: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    say: Callable[[str], None] = lambda text: None,
) -> Path:
    """Write a copy of ``model_path`` at ``output`` with its thresholds and card.

    ``healthy`` scans (no lesion masks) give the ``healthy-<percentile>`` threshold;
    ``lesion_cases`` (with lesion masks) the ``<lesion_name>-dice`` one and the Dice of every
    threshold on them. ``t_test`` stores a new test-time noise level in a diffusion model first.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExists(f"{output}: already exists; not overwriting it")
    if not healthy:
        raise SettingsError("no healthy scans to calibrate on")
    if any(case.truth is None for case in lesion_cases):
        raise SettingsError("every lesion case needs its lesion mask")
    model, metadata = load_model(model_path)
    state, _ = load_checkpoint(model_path)
    if t_test is not None:
        if not model.uses_noise_level:
            raise SettingsError(f"--t-test: a {metadata['kind']} model has no noise level")
        metadata["hyperparameters"] = {**metadata["hyperparameters"], "t_test": t_test}
        rebuilt = build_model(metadata["kind"], metadata["hyperparameters"], model.spec)
        rebuilt.load_state_dict(state)
        model = rebuilt.eval()
    settings = AnalysisSettings.for_model(metadata, scorer=scorer, samples=samples, device=device, seed=0)

    def announce(what):
        return lambda index, count, case: say(f"{what} {index + 1}/{count}: {case.label}")

    healthy_maps = [analysis.filtered for _, analysis, _ in
                    analyse_cases(healthy, model, settings, announce=announce("healthy"))]
    value, record = healthy_percentile_threshold(healthy_maps, percentile=percentile)
    record["subjects"] = [case.label for case in healthy]
    thresholds: dict[str, Any] = {healthy_threshold_name(percentile): stored_entry(value, settings, record)}

    lesion_results = []
    if lesion_cases:
        analysed = [(analysis, truth) for _, analysis, truth in
                    analyse_cases(lesion_cases, model, settings, announce=announce("lesion case"))]
        sizes = [min_size_in_voxels(analysis.default_min_size_ml, analysis.filtered.spacing_mm)
                 for analysis, _ in analysed]
        value, record = greedy_dice_threshold([analysis.filtered for analysis, _ in analysed],
                                              [truth for _, truth in analysed], min_size_voxels=float(np.max(sizes)))
        record["cases"] = [str(case.image) for case in lesion_cases]
        record["note"] = "tuned on the cases it is scored on: an optimistic upper bound, not a held-out result"
        thresholds[dice_threshold_name(lesion_name)] = stored_entry(value, settings, record)
        for name, entry in thresholds.items():
            dices = [evaluate_analysis(analysis, truth, threshold=entry["value"]).dice for analysis, truth in analysed]
            lesion_results.append({"threshold": name, "dice_per_case": dices, "mean_dice": float(np.mean(dices))})

    card = {key: value for key, value in metadata.items() if key != "format_version"}
    card["training"] = {**card.get("training", {}), "settings": _portable(card.get("training", {}).get("settings", {}))}
    card["default_scorer"] = settings.scorer
    card["thresholds"] = thresholds
    card["calibration"] = {"settings": {key: thresholds[healthy_threshold_name(percentile)][key]
                                        for key in ("scorer", "samples", "noise_levels", "median", "seed")},
                           "source_checkpoint": Path(model_path).name, "dice_at_thresholds": lesion_results}
    if results is not None:
        card["results"] = results
    if limits:
        card["limits"] = list(limits)
    if training_command:
        card["training_command"] = training_command
    save_checkpoint(output, state, card, overwrite=overwrite)
    say(json.dumps({"thresholds": {name: entry["value"] for name, entry in thresholds.items()},
                    "dice_at_thresholds": lesion_results}, indent=1))
    return output


def _lesion_cases(images: Sequence[str], masks: Sequence[str], brain_masks: Sequence[str]) -> list[LabelledCase]:
    if len(masks) != len(images):
        raise SettingsError(f"{len(images)} --lesion-image but {len(masks)} --lesion-mask")
    if brain_masks and len(brain_masks) != len(images):
        raise SettingsError("give one --lesion-brain-mask per --lesion-image (or 'none'), or none at all")
    brains = [None if brain is None or brain.lower() == "none" else brain
              for brain in (brain_masks or [None] * len(images))]
    return [LabelledCase(image, mask, brain) for image, mask, brain in zip(images, masks, brains)]


def healthy_cases(model_path: str | Path, data: Sequence[str] | None = None, brain_masks: str | None = None, *,
                  limit: int | None = None) -> list[LabelledCase]:
    """Healthy scans to calibrate on: ``data`` (folder, CSV or files) with its brain-mask
    folder, or by default the run's validation subjects, read from the checkpoint."""
    from napari_brain_uad.checkpoint import read_metadata

    if data:
        scans = find_scans(data[0] if len(data) == 1 else list(data), brain_masks)
    else:
        metadata = read_metadata(model_path)
        settings = metadata.get("training", {}).get("settings", {})
        subjects = metadata.get("training_data", {}).get("validation_subjects") or []
        if not subjects or not settings.get("data"):
            raise SettingsError(f"{model_path}: it names no validation subjects and data folder; give --healthy")
        every = find_scans(settings["data"], settings.get("brain_masks"))
        scans = [pair for pair in every if pair.subject in set(subjects)]
        if len(scans) != len(subjects):
            raise SettingsError(f"only {len(scans)} of the {len(subjects)} validation subjects were found in "
                                f"{settings['data']}")
    scans = scans[:limit] if limit else scans
    return [LabelledCase(pair.image, None, pair.brain_mask, name=pair.subject) for pair in scans]


def _portable(settings: dict) -> dict:
    """Training settings without the trainer's absolute paths (folder names only)."""
    return {key: (Path(value).name if key in PATH_SETTINGS and isinstance(value, str) else value)
            for key, value in settings.items()}


if __name__ == "__main__":
    sys.exit(main())
