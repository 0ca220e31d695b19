"""``brain-uad``: score scans from the command line with the same core as the widget.

    brain-uad score SCAN.nii.gz --model MODEL.safetensors --out-map MAP.nii.gz \\
        [--brain-mask MASK.nii.gz] [--scorer NAME] [--samples N] [--noise-levels 250 500 750] \\
        [--out-recon RECON.nii.gz] [--out-mask MASK.nii.gz --threshold VALUE|NAME]
    brain-uad models MODEL.safetensors ...

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

from .scoring import SCORERS


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad", description="Unsupervised anomaly detection in brain MRI.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="anomaly map (and reconstruction, mask) of one scan")
    score.add_argument("input", help="the scan (.nii or .nii.gz)")
    score.add_argument("--model", required=True, help="model checkpoint (.safetensors) written by brain-uad-train")
    score.add_argument("--brain-mask", help="brain mask on the scan's grid (omit for a skull-stripped scan)")
    score.add_argument("--scorer", choices=list(SCORERS), help="anomaly score (default: the model's, else ssim-ens)")
    score.add_argument("--samples", type=int, default=None, help="reconstructions with fresh noise (default 1; 10 for MHD)")
    score.add_argument("--noise-levels", type=int, nargs="+", help="noise level(s) t; several are averaged")
    score.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    score.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0: same input, same map)")
    score.add_argument("--out-map", help="write the anomaly map here")
    score.add_argument("--out-recon", help="write the pseudo-healthy reconstruction here")
    score.add_argument("--out-mask", help="write the binary anomaly mask here (needs --threshold)")
    score.add_argument("--threshold", help="a number, or the name of a threshold stored with the model")
    score.add_argument("--min-size-ml", type=float, help="drop findings up to this volume (default: 7 model voxels)")
    score.add_argument("--overwrite", action="store_true", help="replace existing output files")
    score.add_argument("--quiet", action="store_true", help="no progress on stderr")

    models = commands.add_parser("models", help="show the card of model checkpoints")
    models.add_argument("paths", nargs="+", help="checkpoint files")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "score":
            return score_command(arguments)
        return models_command(arguments)
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
    from .analysis import AnalysisSettings, analyse_scan
    from .checkpoint import read_metadata
    from .io import read_nifti, save_source_array
    from .models import load_model

    outputs = {name: getattr(arguments, f"out_{name}") for name in ("map", "recon", "mask")}
    if not any(outputs.values()):
        raise CommandError("nothing to write: give --out-map, --out-recon and/or --out-mask")
    if outputs["mask"] and arguments.threshold is None:
        raise CommandError("--out-mask needs --threshold (a number or a stored threshold's name)")
    for path in filter(None, outputs.values()):
        if Path(path).exists() and not arguments.overwrite:
            raise FileExistsError(f"{path}: already exists; not overwriting it")
        if not str(path).endswith((".nii.gz", ".nii")):
            raise CommandError(f"{path}: output names must end in .nii.gz or .nii")

    metadata = read_metadata(arguments.model)
    threshold = _threshold(arguments.threshold, metadata) if arguments.threshold is not None else None
    scorer = arguments.scorer or metadata.get("default_scorer", "ssim-ens")
    samples = arguments.samples or (10 if SCORERS[scorer].needs == "samples" else 1)
    settings = AnalysisSettings(scorer=scorer, samples=samples, device=arguments.device, seed=arguments.seed,
                                noise_levels=tuple(arguments.noise_levels) if arguments.noise_levels else None)

    with warnings.catch_warnings():
        # Warnings about the scan (oblique, 4D, ...) go to stderr as one line each.
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        scan = read_nifti(arguments.input)
        brain = read_nifti(arguments.brain_mask, allow_empty=True) if arguments.brain_mask else None
        model, _ = load_model(arguments.model)
        analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings,
                                progress=None if arguments.quiet else _progress_bar())
    if not arguments.quiet:
        print(file=sys.stderr)
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


def _threshold(text: str, metadata: dict) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    stored = metadata.get("thresholds", {})
    if text not in stored:
        known = ", ".join(stored) or "none"
        raise CommandError(f"--threshold {text!r} is neither a number nor a threshold stored with the model ({known})")
    value = stored[text]
    return float(value["value"] if isinstance(value, dict) else value)


def _progress_bar():
    def report(fraction: float, stage: str) -> None:
        filled = int(round(30 * fraction))
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}% {stage:<16}", end="", file=sys.stderr)

    return report


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"brain-uad: warning: {message}", file=sys.stderr)


def models_command(arguments) -> int:
    from .checkpoint import read_metadata

    for path in arguments.paths:
        metadata = read_metadata(path)
        card = {
            "file": str(path),
            "kind": metadata["kind"],
            "model_space": metadata.get("model_space"),
            "hyperparameters": metadata.get("hyperparameters"),
            "training_data": {key: value for key, value in metadata.get("training_data", {}).items()
                              if key in ("description", "licence", "training_slices")},
            "validation_best_loss": metadata.get("validation", {}).get("best_loss"),
            "thresholds": metadata.get("thresholds", {}),
        }
        print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
