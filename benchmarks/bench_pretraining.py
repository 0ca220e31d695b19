"""ADDP's claim on our data: does denoising pre-training help a segmentation network that gets
little training? SADM's U-Net, few steps on synthetic anomalies, with and without it.

Run by hand:
    NAPARI_BRAIN_UAD_DATA=/work/shared/data .venv/bin/python benchmarks/bench_pretraining.py \\
        [--base-model ixi-t1-dae-n4] [--training-subjects 20] [--steps 150] [--pretrain-steps 300] \\
        [--json results.json]

The seed (ADDP) reports Dice 0.72-0.74 with 1 % of BraTS labels after denoising pre-training
against 0.19 without. Here the scarce resource is training steps, not labels (synthetic
anomalies are free): each variant trains SADM's Siamese U-Net on the same ``--training-subjects``
healthy IXI scans (the default DAE as the frozen base) for ``--steps`` steps of synthetic
anomalies, after ``--pretrain-steps`` steps of

- nothing (the reference, same run),
- ``denoise-decoder`` (DPD: encoder frozen at its initial weights, decoder predicts the noise),
- ``denoise-encoder-decoder`` (DPED: the whole U-Net predicts the noise),

on the same scans (``--variants`` picks some; ``--variants none --steps N`` with N = steps +
pre-training steps gives the reference the same number of steps in all). Scored on synthetic anomalies (fixed seed) in slices of held-out validation
subjects: pooled AUPRC and best Dice of the segmentation output alone, and the validation BCE.
Every variant starts from the same initial weights (same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from brain_uad_training.config import TrainingConfig, read_config_file
from brain_uad_training.data import find_scans, load_model_space, split_subjects, validation_slices
from brain_uad_training.fit import fit
from napari_brain_uad.metrics import auprc_pooled, best_dice_pooled
from napari_brain_uad.model_registry import resolve_model
from napari_brain_uad.models import SADMConfig, load_model
from napari_brain_uad.models.sadm import synthetic_anomalies

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))
VARIANTS = (None, "denoise-decoder", "denoise-encoder-decoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="ixi-t1-dae-n4")
    parser.add_argument("--training-subjects", type=int, default=20)
    parser.add_argument("--validation-subjects", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--variants", nargs="+", default=["none", *VARIANTS[1:]], choices=["none", *VARIANTS[1:]],
                        help="which pre-trainings to compare (none: the reference)")
    parser.add_argument("--output", default="/tmp/bench_pretraining")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    base, _ = load_model(resolve_model(args.base_model))
    settings = read_config_file(REPOSITORY / "training/configs/ixi-t1-sadm-cpu.toml")
    pairs = [pair for pair in find_scans(settings["data"], settings["brain_masks"])
             if not pair.subject.startswith(tuple(settings["exclude_subjects"]))]
    training_pairs, validation_pairs = split_subjects(pairs, settings["validation_fraction"], settings["seed"])
    started = time.perf_counter()
    training = load_model_space(training_pairs[: args.training_subjects], base.spec)
    validation = load_model_space(validation_pairs[: args.validation_subjects], base.spec)
    print(f"{len(training)} training and {len(validation)} validation scans in model space "
          f"in {time.perf_counter() - started:.0f} s")

    slices, brain = validation_slices(validation, 64)
    generator = torch.Generator().manual_seed(1234)
    anomalous, truth = synthetic_anomalies(slices, brain, SADMConfig(channels=tuple(args.channels)), generator)

    results = []
    for variant in [None if choice == "none" else choice for choice in args.variants]:
        name = variant or "none (reference)"
        config = TrainingConfig(
            data=str(DATA), output=f"{args.output}/{variant or 'none'}", kind="sadm", base_model=args.base_model,
            modality=base.spec.modality, bias_correction=base.spec.bias_correction, steps=args.steps,
            batch_size=args.batch_size, learning_rate=settings["learning_rate"], augment=False,
            validation_slices=64, validate_every=args.steps, seed=0, model={"channels": args.channels},
            pretrain=variant, pretrain_steps=args.pretrain_steps if variant else 0)
        started = time.perf_counter()
        result = fit(config, overwrite=True, scans=(training, validation), show_progress=False)
        seconds = time.perf_counter() - started
        model, _ = load_model(result.last)
        with torch.no_grad():
            reconstruction = model.base.reconstruct(anomalous)
            segmentation = torch.sigmoid(model.segmentation_logits(anomalous, reconstruction))
        maps = [segmentation[i, 0].numpy() for i in range(len(slices))]
        truths = [truth[i, 0].numpy() > 0 for i in range(len(slices))]
        masks = [brain[i, 0].numpy() for i in range(len(slices))]
        row = {"variant": name, "validation_bce": result.validation_history[-1][1],
               "auprc": auprc_pooled(maps, truths, masks), "best_dice": best_dice_pooled(maps, truths, masks),
               "seconds": seconds}
        results.append(row)
        print(f"  {name}: AUPRC {row['auprc']:.3f}, [Dice] {row['best_dice']:.3f}, "
              f"validation BCE {row['validation_bce']:.4f}, {seconds:.0f} s", flush=True)

    print(f"\nSADM U-Net ({args.channels}), {args.steps} steps of synthetic anomalies on {len(training)} IXI scans; "
          f"pre-training {args.pretrain_steps} steps; scored on synthetic anomalies in {len(slices)} validation slices")
    print("\n| pre-training | AUPRC | [Dice] | validation BCE | time |\n|---|---|---|---|---|")
    for row in results:
        print(f"| {row['variant']} | {row['auprc']:.3f} | {row['best_dice']:.3f} | {row['validation_bce']:.4f} | "
              f"{row['seconds']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "settings": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
