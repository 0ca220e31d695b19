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
``thresholds``, ``typicality`` (the healthy scans' statistics that tell a typical scan from an
atypical one), ``calibration`` and, when given, ``results``, ``limits`` and
``training_command``; machine-specific paths in the training settings are replaced by the
names of the folders, so a shipped card does not carry the trainer's file system. The work is
``napari_brain_uad.calibration.calibrate``, the same function a user's ``brain-uad calibrate``
runs on their own scanner's scans.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_brain_uad.calibration import calibrate
from napari_brain_uad.errors import BrainUADError, OutputExists, SettingsError, internal_error_message
from napari_brain_uad.evaluation import LabelledCase
from napari_brain_uad.scoring import SCORERS
from napari_brain_uad.thresholds import HEALTHY_PERCENTILE

from .data import find_scans


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad-calibrate", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True, help="trained checkpoint (e.g. runs/NAME/best.safetensors)")
    parser.add_argument("--output", required=True, help="calibrated checkpoint to write (.safetensors)")
    parser.add_argument("--scorer", choices=list(SCORERS),
                        help="the model's default scorer (default: the checkpoint's, else ssim-ens)")
    parser.add_argument("--samples", type=int, help="reconstructions per scan (default 1; 10 for MHD scorers)")
    parser.add_argument("--t-test", type=int,
                        help="store this test-time noise level in the model (diffusion kinds), e.g. the best on validation")
    parser.add_argument("--beside-default", action="store_true",
                        help="calibrate --scorer as an option beside the model's default scorer (its thresholds "
                        "named after it; the default scorer and typicality kept)")
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
        card = {}
        if arguments.results:
            card["results"] = json.loads(Path(arguments.results).read_text())
        if arguments.limits:
            card["limits"] = list(arguments.limits)
        if arguments.training_command:
            card["training_command"] = arguments.training_command
        written = calibrate(
            arguments.model, arguments.output, scorer=arguments.scorer, samples=arguments.samples,
            t_test=arguments.t_test, percentile=arguments.percentile, healthy=healthy, lesion_cases=lesion_cases,
            lesion_name=arguments.lesion_name, card=card, beside_default=arguments.beside_default,
            device=arguments.device, overwrite=arguments.overwrite, say=say,
        )
        say(json.dumps({"thresholds": {name: entry["value"] for name, entry in written["thresholds"].items()},
                        "typicality": {key: (written.get("typicality") or {}).get(key)
                                       for key in ("healthy_median", "healthy_spread")},
                        "dice_at_thresholds": written["calibration"]["dice_at_thresholds"]}, indent=1))
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
    # A scan's exclusion mask (its lesions) goes in as the case's truth: calibration leaves it out.
    return [LabelledCase(pair.image, pair.exclude_mask, pair.brain_mask, name=pair.subject) for pair in scans]


if __name__ == "__main__":
    sys.exit(main())
