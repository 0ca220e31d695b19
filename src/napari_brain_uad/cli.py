"""``brain-uad``: score scans from the command line with the same core as the widget.

    brain-uad score SCAN.nii.gz --out-map MAP.nii.gz [--model NAME|PATH] \\
        [--brain-mask MASK.nii.gz] [--scorer NAME] [--samples N] [--noise-levels 250 500 750] \\
        [--out-recon RECON.nii.gz] [--out-mask MASK.nii.gz [--threshold VALUE|NAME]]
    brain-uad evaluate --images A.nii.gz B.nii.gz --masks A_lesions.nii.gz B_lesions.nii.gz \\
        [--brain-masks ...] [--model NAME|PATH] [--scorer NAME] [--json RESULTS.json]
    brain-uad models [NAME|PATH ...]

Without ``--model`` the bundled default model is used, with the scorer it was calibrated for.

Every output is written on the input's own grid with its affine, to a temporary name renamed
when complete, and never over an existing file unless ``--overwrite``. Errors end with one line
on stderr and exit status 2 (1 for an unexpected failure), and leave no output behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .model_registry import default_threshold_name
from .scoring import SCORERS


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad", description="Unsupervised anomaly detection in brain MRI.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="anomaly map (and reconstruction, mask) of one scan")
    score.add_argument("input", help="the scan (.nii or .nii.gz)")
    _model_arguments(score)
    score.add_argument("--brain-mask", help="brain mask on the scan's grid (omit for a skull-stripped scan)")
    score.add_argument("--out-map", help="write the anomaly map here")
    score.add_argument("--out-recon", help="write the pseudo-healthy reconstruction here")
    score.add_argument("--out-mask", help="write the binary anomaly mask here")
    score.add_argument("--threshold", help="a number, or the name of a threshold stored with the model "
                       "(default: the model's healthy-percentile threshold for the scorer)")
    score.add_argument("--min-size-ml", type=float, help="drop findings up to this volume (default: 7 model voxels)")
    score.add_argument("--overwrite", action="store_true", help="replace existing output files")
    score.add_argument("--quiet", action="store_true", help="no progress on stderr")

    evaluate = commands.add_parser("evaluate", help="[Dice], Dice at a threshold, AUPRC and l1-ratio on scans with lesion masks")
    evaluate.add_argument("--images", nargs="+", required=True, help="scans with lesions")
    evaluate.add_argument("--masks", nargs="+", required=True, help="their lesion masks, in the same order")
    evaluate.add_argument("--brain-masks", nargs="+", help="their brain masks (omit for skull-stripped scans)")
    _model_arguments(evaluate)
    evaluate.add_argument("--threshold", help="threshold for the Dice column: a number or a stored name "
                          "(default: the model's healthy-percentile threshold for the scorer, if any)")
    evaluate.add_argument("--json", help="also write the results here as JSON")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    evaluate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    models = commands.add_parser("models", help="list the bundled and downloadable models, or show checkpoints' cards")
    models.add_argument("paths", nargs="*", help="model names or checkpoint files (default: every registry model)")
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model name (see `brain-uad models`) or a checkpoint file "
                        "(default: the bundled model)")
    parser.add_argument("--scorer", choices=list(SCORERS), help="anomaly score (default: the model's, else ssim-ens)")
    parser.add_argument("--samples", type=int, default=None, help="reconstructions with fresh noise (default 1; 10 for MHD)")
    parser.add_argument("--noise-levels", type=int, nargs="+", help="noise level(s) t; several are averaged")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0: same input, same map)")


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        command = {"score": score_command, "evaluate": evaluate_command, "models": models_command}
        return command[arguments.command](arguments)
    except CommandError as error:
        print(f"brain-uad: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # ScanError and CheckpointError: bad input files
        print(f"brain-uad: error: {error}", file=sys.stderr)
        return 2
    except FileExistsError as error:
        print(f"brain-uad: error: {error} (use --overwrite to replace it)", file=sys.stderr)
        return 2


def score_command(arguments) -> int:
    from .io import read_nifti, save_source_array
    from .models import load_model

    outputs = {name: getattr(arguments, f"out_{name}") for name in ("map", "recon", "mask")}
    if not any(outputs.values()):
        raise CommandError("nothing to write: give --out-map, --out-recon and/or --out-mask")
    for path in filter(None, outputs.values()):
        if Path(path).exists() and not arguments.overwrite:
            raise FileExistsError(f"{path}: already exists; not overwriting it")
        if not str(path).endswith((".nii.gz", ".nii")):
            raise CommandError(f"{path}: output names must end in .nii.gz or .nii")

    model_path, metadata, settings = _model_and_settings(arguments)
    threshold = None
    if outputs["mask"]:
        threshold = _threshold(arguments.threshold, metadata, settings)
        if threshold is None:
            raise CommandError(f"--out-mask needs --threshold: the model stores none for scorer {settings.scorer}")

    with _warnings_as_lines():
        scan = read_nifti(arguments.input)
        brain = read_nifti(arguments.brain_mask, allow_empty=True) if arguments.brain_mask else None
        analysis = _analyse(scan, brain, load_model(model_path)[0], settings, quiet=arguments.quiet)
    if outputs["map"]:
        save_source_array(analysis.anomaly_map, scan.geometry, outputs["map"], kind="image", overwrite=arguments.overwrite)
    if outputs["recon"]:
        save_source_array(analysis.reconstruction, scan.geometry, outputs["recon"], kind="image",
                          overwrite=arguments.overwrite)
    if outputs["mask"]:
        mask = analysis.mask_at(threshold, arguments.min_size_ml)
        save_source_array(mask, scan.geometry, outputs["mask"], kind="labels", overwrite=arguments.overwrite)
        if not arguments.quiet:
            findings = analysis.findings(threshold, arguments.min_size_ml)
            print(f"{len(findings)} finding(s), {sum(f['volume_ml'] for f in findings):.2f} mL in all", file=sys.stderr)
    return 0


def _model_and_settings(arguments):
    """The checkpoint file, its metadata, and the analysis settings (defaults from the model)."""
    from .analysis import AnalysisSettings
    from .checkpoint import read_metadata
    from .model_registry import resolve_model

    model_path = resolve_model(arguments.model, progressbar=not arguments.quiet)
    metadata = read_metadata(model_path)
    scorer = arguments.scorer or metadata.get("default_scorer", "ssim-ens")
    samples = arguments.samples or (10 if SCORERS[scorer].needs == "samples" else 1)
    settings = AnalysisSettings(scorer=scorer, samples=samples, device=arguments.device, seed=arguments.seed,
                                noise_levels=tuple(arguments.noise_levels) if arguments.noise_levels else None)
    return model_path, metadata, settings


def _analyse(scan, brain, model, settings, *, quiet: bool):
    from .analysis import analyse_scan

    analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings,
                            progress=None if quiet else _progress_bar())
    if not quiet:
        print(file=sys.stderr)
    return analysis


def _threshold(text: str | None, metadata: dict, settings) -> float | None:
    """A number, a stored threshold's name, or (None) the model's default for the scorer."""
    if text is None:
        text = default_threshold_name(metadata, settings.scorer)
        if text is None:
            return None
    try:
        return float(text)
    except ValueError:
        pass
    every = metadata.get("thresholds", {})
    if text not in every:
        known = ", ".join(every) or "none"
        raise CommandError(f"--threshold {text!r} is neither a number nor a threshold stored with the model ({known})")
    entry = every[text]
    if not isinstance(entry, dict):
        return float(entry)
    if entry.get("scorer", settings.scorer) != settings.scorer:
        raise CommandError(f"threshold {text!r} was calibrated for scorer {entry['scorer']}, not {settings.scorer}; "
                           f"use --scorer {entry['scorer']} or give a number")
    for key in ("samples", "noise_levels"):
        stored, used = entry.get(key), getattr(settings, key)
        if key in entry and (list(stored) if isinstance(stored, (list, tuple)) else stored) != \
                (list(used) if isinstance(used, (list, tuple)) else used):
            warnings.warn(f"threshold {text!r} was calibrated with {key} = {stored}, this run uses {used}")
    return float(entry["value"])


class _warnings_as_lines(warnings.catch_warnings):
    """Warnings about the scan (oblique, 4D, ...) go to stderr as one line each."""

    def __enter__(self):
        result = super().__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        return result


def _progress_bar():
    def report(fraction: float, stage: str) -> None:
        filled = int(round(30 * fraction))
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}% {stage:<16}", end="", file=sys.stderr)

    return report


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"brain-uad: warning: {message}", file=sys.stderr)


def evaluate_command(arguments) -> int:
    import numpy as np

    from .io import read_nifti
    from .metrics import auprc_pooled, best_dice_pooled, case_table, dice, mean_row
    from .models import load_model

    images, masks = arguments.images, arguments.masks
    brains = arguments.brain_masks
    if len(masks) != len(images):
        raise CommandError(f"{len(images)} --images but {len(masks)} --masks: give one lesion mask per image")
    if brains is not None and len(brains) != len(images):
        raise CommandError(f"{len(images)} --images but {len(brains)} --brain-masks: give one per image, or none")
    if arguments.json:
        if Path(arguments.json).exists() and not arguments.overwrite:
            raise FileExistsError(f"{arguments.json}: already exists; not overwriting it")
    model_path, metadata, settings = _model_and_settings(arguments)
    threshold_name = arguments.threshold or default_threshold_name(metadata, settings.scorer)
    threshold = _threshold(threshold_name, metadata, settings) if threshold_name else None

    maps, truths, regions, originals, reconstructions, mask_dice = [], [], [], [], [], []
    with _warnings_as_lines():
        model, _ = load_model(model_path)
        for index, (image, mask) in enumerate(zip(images, masks)):
            if not arguments.quiet:
                print(f"case {index + 1}/{len(images)}: {image}", file=sys.stderr)
            scan = read_nifti(image)
            truth = read_nifti(mask, allow_empty=True)
            if truth.data.shape != scan.data.shape or not np.allclose(truth.geometry.affine, scan.geometry.affine,
                                                                       atol=1e-3):
                raise CommandError(f"{mask}: the lesion mask is not on the grid of {image} (shape or affine differs)")
            brain = read_nifti(brains[index], allow_empty=True) if brains else None
            analysis = _analyse(scan, brain, model, settings, quiet=arguments.quiet)
            region = analysis.filtered.region
            maps.append(analysis.filtered.values)
            truths.append((truth.data > 0) & region)
            regions.append(region)
            originals.append(scan.data)
            reconstructions.append(analysis.reconstruction)
            if threshold is not None:
                mask_dice.append(dice(analysis.mask_at(threshold), truths[-1]))

    rows, _ = case_table(maps, truths, regions, names=[Path(image).name for image in images],
                         images=originals, reconstructions=reconstructions)
    for row, value in zip(rows, mask_dice):
        row["dice"] = value
    mean = mean_row(rows)
    pooled = {"best_dice": float(best_dice_pooled(maps, truths, regions)),
              "auprc": float(auprc_pooled(maps, truths, regions))}
    columns = ["case", "lesion_voxels", "best_dice", "dice", "auprc", "l1_ratio"] if mask_dice else \
        ["case", "lesion_voxels", "best_dice", "auprc", "l1_ratio"]
    print(f"model {metadata['kind']} ({model_path.name}), scorer {settings.scorer}, N = {settings.samples}"
          + (f", threshold {threshold_name} = {threshold:.6g}" if threshold is not None else ", no threshold"))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in [*rows, mean]:
        print("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    print(f"| pooled | | {pooled['best_dice']:.4f} |" + (" |" if mask_dice else "") + f" {pooled['auprc']:.4f} | |")
    if arguments.json:
        from .io import write_atomically

        document = {"model": str(model_path), "kind": metadata["kind"], "scorer": settings.scorer,
                    "samples": settings.samples, "threshold": {"name": threshold_name, "value": threshold},
                    "cases": rows, "mean": mean, "pooled": pooled,
                    "note": "metrics on each scan's own grid, inside the eroded brain mask, after the 5x5x5 median"}
        text = json.dumps(document, indent=2, default=float)
        write_atomically(arguments.json, lambda temporary: Path(temporary).write_text(text))
    return 0


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def models_command(arguments) -> int:
    from .model_registry import model_card, registry_cards, resolve_model

    if not arguments.paths:
        print(json.dumps(registry_cards(), indent=2))
        return 0
    for name_or_path in arguments.paths:
        print(json.dumps(model_card(resolve_model(name_or_path)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
