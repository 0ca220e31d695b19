"""``brain-uad-train``: train a model on healthy scans from a config file and/or flags.

    brain-uad-train --data ixi_t1 --brain-masks ixi_t1/brainmask --output runs/ddpm \\
        --kind ddpm --steps 3000 --batch-size 16 --model '{"noise": "simplex"}'

Flags override the config file (``--config run.toml``). On several GPUs or machines the same
command runs under PyTorch's launcher: ``torchrun --nproc_per_node=4 -m brain_uad_training ...``.
Errors in the settings or the data end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from napari_brain_uad.errors import BrainUADError, OutputExists, internal_error_message
from napari_brain_uad.models import MODEL_KINDS

from .config import TrainingConfig, read_config_file
from .pretrain_denoise import PRETRAIN_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brain-uad-train",
        description="Train an anomaly-detection model on healthy brain MRI; writes best/last checkpoints.",
        epilog="Distributed: torchrun --nproc_per_node=N -m brain_uad_training [the same flags]",
    )
    parser.add_argument("--config", help="TOML or JSON file of settings (flags override it)")
    parser.add_argument("--data", nargs="+",
                        help="folder of healthy NIfTI scans, a CSV (image,brain_mask[,exclude_mask]), or files")
    parser.add_argument("--brain-masks", help="folder of brain masks named <subject>_*.nii.gz (omit for skull-stripped scans)")
    parser.add_argument("--exclude-subjects", nargs="+", metavar="PREFIX",
                        help="leave out scans whose names start with these (e.g. a healthy test set)")
    parser.add_argument("--output", help="folder for the checkpoints, the resume state and the log")
    parser.add_argument("--kind", choices=sorted(MODEL_KINDS), help="model kind (default ddpm)")
    parser.add_argument("--model", type=json.loads, metavar="JSON",
                        help="the kind's hyper-parameters as JSON, e.g. '{\"noise\": \"simplex\"}'")
    parser.add_argument("--modality", help="contrast of the training scans, stored in the model (default T1)")
    parser.add_argument("--spacing-mm", type=float, help="model-space voxel size (default 2)")
    parser.add_argument("--in-plane", type=int, nargs=2, metavar=("X", "Y"), help="model-space slice size (default 96 96)")
    parser.add_argument("--bias-correction", choices=("n4",),
                        help="remove each scan's bias field with N4 first, as the thesis does (default: none)")
    parser.add_argument("--data-description", help="what the scans are, stored in the model card")
    parser.add_argument("--data-licence", help="the training data's licence, stored in the model card")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 3000)")
    parser.add_argument("--batch-size", type=int, help="slices per step and process (default 32)")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--gradient-clip-norm", type=float, help="largest gradient norm per step (default: no clipping)")
    parser.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    parser.add_argument("--validation-fraction", type=float, help="share of subjects held out for validation (default 0.1)")
    parser.add_argument("--validation-slices", type=int, help="validation slices (default 64)")
    parser.add_argument("--validate-every", type=int, help="steps between validations and checkpoints (default 100)")
    parser.add_argument("--thick-slice-probability", type=float,
                        help="share of training slices made 2 to --thickest-slice slices thick (default 0)")
    parser.add_argument("--thickest-slice", type=int, help="thickest simulated slice, in model-space slices (default 4)")
    parser.add_argument("--exclude-dilation-mm", type=float,
                        help="growth of the training list's exclusion masks before training (default 4)")
    parser.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="no augmentation")
    parser.add_argument("--pretrain-encoder-steps", type=int,
                        help="cddpm: steps of masked pre-training of the context encoder first (default 0)")
    parser.add_argument("--pretrain", choices=PRETRAIN_MODES,
                        help="ADDP denoising pre-training first (sadm, ae, dae): decoder only, or encoder and decoder")
    parser.add_argument("--pretrain-steps", type=int, help="steps of the denoising pre-training")
    parser.add_argument("--base-model", metavar="NAME|PATH",
                        help="sadm: the trained reconstruction model it sits on, frozen (a model name or a checkpoint)")
    parser.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, ... (default auto)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> TrainingConfig:
    values = read_config_file(arguments.config) if arguments.config else {}
    flags = {
        name: value for name, value in vars(arguments).items()
        if value is not None and name not in ("config", "resume", "overwrite", "quiet")
    }
    if "data" in flags:
        flags["data"] = flags["data"][0] if len(flags["data"]) == 1 else flags["data"]
    if "model" in flags:
        flags["model"] = {**values.get("model", {}), **flags["model"]}
    return TrainingConfig.from_dict({**values, **flags})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    # Imported here so that --help answers before torch and MONAI load.
    from .fit import fit

    try:
        config = config_from_arguments(arguments)
        result = fit(config, resume=arguments.resume, overwrite=arguments.overwrite, show_progress=not arguments.quiet)
    except OutputExists as error:
        print(f"brain-uad-train: error: {error} (use --overwrite to replace it, or --resume)", file=sys.stderr)
        return 2
    except BrainUADError as error:  # bad settings, data or checkpoints: the message says which
        print(f"brain-uad-train: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: traceback to the log, one plain line to the user
        print(f"brain-uad-train: {internal_error_message(error, 'brain-uad-train')}", file=sys.stderr)
        return 1
    if not arguments.quiet:
        best = f"; best validation loss {result.best_validation_loss:.5f}" if result.best_validation_loss is not None else ""
        print(f"{result.steps_done} steps; checkpoints in {result.output}{best}", file=sys.stderr)
    return 130 if result.stopped_early else 0


if __name__ == "__main__":
    sys.exit(main())
