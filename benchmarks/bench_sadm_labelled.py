"""SADM's semi-supervised variant on real MS lesions, leave one patient out.

The paper's second setting (thesis sec. 4.4): stage II learns a few labelled real cases instead
of synthetic anomalies. Here, for each of the five `ms_clinical` patients, a labelled SADM on the
bundled FLAIR DAE (``nichart-flair-dae``, frozen) learns the other four patients' FLAIRs and
their hand-drawn lesion masks, and is measured on the one left out with the real-lesion
benchmark (``bench_real_lesions.py``, the same brains, baselines and columns). Its numbers are
**supervised**: it has seen MS lesions of this very clinic and scanner, which no unsupervised
model has; report them apart.

    OMP_NUM_THREADS=1 NAPARI_BRAIN_UAD_DATA=../shared/data .venv/bin/python \\
        benchmarks/bench_sadm_labelled.py --output runs/sadm-labelled-lopo [--steps 1000]

Each fold trains with ``brain-uad-train`` (an interrupted fold resumes where it stopped) and is
measured with ``bench_real_lesions.py --json``; the table at the end is the held-out patients'
rows, with the means.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
SET = "ms_clinical"
BASE_MODEL = "nichart-flair-dae"
SCORERS = ("ssim+segmentation", "residual+segmentation")


def data_root() -> Path:
    return Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data")).resolve()


def patients(root: Path) -> list[str]:
    folder = root / SET
    return sorted(p.name for p in folder.iterdir() if (p / "FLAIR.nii.gz").is_file() and (p / "lesionmask.nii.gz").is_file())


def training_list(root: Path, chosen: list[str], path: Path) -> Path:
    """A training list of the chosen patients' FLAIRs, brain masks and lesion masks (the targets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "brain_mask", "exclude_mask", "subject"])
        for patient in chosen:
            folder = root / SET / patient
            writer.writerow([folder / "FLAIR.nii.gz", folder / "brainmask.nii.gz", folder / "lesionmask.nii.gz", patient])
    return path


def run(command: list[str]) -> None:
    print("$", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for each fold's run and results")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--patients", nargs="+", help="only these held-out patients (default: all five)")
    args = parser.parse_args()
    root = data_root()
    if not (root / SET).is_dir():
        print(f"the {SET} cases are not at {root / SET}; set NAPARI_BRAIN_UAD_DATA", file=sys.stderr)
        return 2
    everyone = patients(root)
    python = sys.executable
    train = [python, "-m", "brain_uad_training"]
    rows = []
    for held_out in args.patients or everyone:
        fold = args.output / held_out
        listing = training_list(root, [p for p in everyone if p != held_out], fold / "training.csv")
        run([*train, "--data", listing, "--kind", "sadm", "--base-model", BASE_MODEL, "--modality", "FLAIR",
             "--bias-correction", "n4", "--model", json.dumps({"supervision": "labelled",
                                                                "channels": [16, 32, 64, 128]}),
             "--steps", args.steps, "--batch-size", 16, "--learning-rate", 1e-4, "--no-augment",
             "--validation-fraction", 0, "--validate-every", args.steps, "--seed", 0,
             "--data-description", f"{SET}: FLAIRs of the MS patients other than {held_out}, hand-drawn lesion masks",
             "--output", fold / "run", "--quiet",
             *(["--resume"] if (fold / "run" / "training_state.safetensors").is_file() else [])])
        results = fold / "held_out.json"
        others = [f"{SET}/{p}" for p in everyone if p != held_out]
        run([python, HERE / "bench_real_lesions.py", "--model", fold / "run" / "last.safetensors",
             "--contrast", "FLAIR", "--cases", SET, *[a for o in others for a in ("--exclude-case", o)],
             *[a for s in SCORERS for a in ("--scorer", s)], "--json", results])
        rows.extend(row for row in json.loads(results.read_text())["cases"] if row["contrast"] == "FLAIR")
    (args.output / "held_out_cases.json").write_text(json.dumps(rows, indent=1))
    print("\n## Labelled SADM, leave one patient out (supervised; FLAIR, ms_clinical)\n")
    print("| row (the fold's model, or its baseline) | brain | held-out cases | [Dice] | AUPRC |")
    print("|---|---|---|---|---|")
    by_row: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        # Each fold's model has its own name; the rows are the same map made by each fold's model.
        name = row["row"].split(" · ", 1)[-1] if row.get("scorer") else row["row"].split(" · ", 1)[0]
        by_row.setdefault((name, row["brain"]), []).append(row)
    for (name, brain), group in sorted(by_row.items()):
        dice = sum(r["best_dice"] for r in group) / len(group)
        auprc = sum(r["auprc"] for r in group) / len(group)
        print(f"| {name} | {brain} | {len(group)} | {dice:.3f} | {auprc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
