"""Brain extraction from scans with the skull on, and what it does to a model's findings.

Run by hand:
    NAPARI_BRAIN_UAD_DATA=/work/shared/data .venv/bin/python benchmarks/bench_brain_extraction.py \\
        [--subjects 6] [--model NAME|PATH] [--no-clinical] [--json results.json]

Three parts, each a markdown table:

1. **Extraction** on held-out healthy IXI T1 scans (raw, skull on, 2 mm; the training config's
   test subjects): the brain as the plugin finds it for a scan given without a mask
   (``brain_mask.find_brain``), against the IXI reference mask: Dice, the two volumes in mL, and
   the seconds the extraction takes. The networks are loaded, and one extraction and one
   analysis run, before anything is timed: any one-off setup is printed apart. Times need an
   otherwise idle machine: with another process on the two cores, torch's threads ran up to
   20 times slower here.
2. **Findings on a healthy scan**: each of those scans analysed with the model (the bundled
   default unless ``--model``; its default scorer and settings) as a user would run it, raw
   without a mask (the brain extracted), and with the reference mask — the reference, measured
   in the same run. Both counted at the model's healthy-percentile threshold: the flagged volume
   in mL (the voxels of ``analysis.mask_at``, i.e. what an exported mask holds) and its share of
   the brain the run used. Every flagged voxel of a healthy scan is a false alarm, so the two
   should agree; their difference is given as a share of the reference brain (the acceptance
   of the brain-extraction issue: within 2 %).
3. **Raw clinical scans** (``mslub_longitudinal_raw``, two MS patients, T1W, T2W and FLAIR as
   acquired: skull on, 3-4 mm slices, no reference mask): the extracted volume in mL (an adult
   brain with its CSF is 1.0-2.0 L) and the seconds it takes; a scan the size checks refuse is
   listed with the refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench_detection import DATA, ixi_subjects, model_as_users_run_it
from napari_brain_uad.analysis import analyse_scan
from napari_brain_uad.brain_extraction import EXTRACTOR, networks
from napari_brain_uad.brain_mask import EXTRACTED, find_brain, voxel_ml
from napari_brain_uad.nifti import ScanError, ScanWarning, read_nifti

CLINICAL = [(patient, contrast) for patient in ("patient01", "patient04") for contrast in ("T1W", "T2W", "FLAIR")]
ACCEPTED_DIFFERENCE = 0.02  # of the brain: the acceptance for the flagged volume


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return float(2 * np.count_nonzero(first & second) / (np.count_nonzero(first) + np.count_nonzero(second)))


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def read_subjects(subjects: list[str]) -> dict[str, tuple]:
    """Each held-out IXI subject's raw scan and reference brain mask, read once for every part."""
    return {subject: (read_nifti(DATA / f"ixi_t1/{subject}_T1.nii.gz"),
                      read_nifti(DATA / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz"))
            for subject in subjects}


def extraction_rows(scans: dict[str, tuple]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Part 1: one row per subject, and the extracted masks (to compare with the analysis's)."""
    rows, masks = [], {}
    for subject, (scan, reference_mask) in scans.items():
        reference = reference_mask.data > 0
        found, seconds = timed(lambda: find_brain(scan))
        masks[subject] = found.mask
        rows.append({
            "subject": subject,
            "source": found.source,  # a raw IXI scan must be extracted; anything else is worth seeing
            "dice": dice(found.mask, reference),
            "extracted_ml": found.volume_ml,
            "reference_ml": float(np.count_nonzero(reference)) * voxel_ml(scan),
            "seconds": seconds,
        })
        print(f"  extraction: {subject} done", flush=True)
    return rows, masks


def finding_rows(scans: dict[str, tuple], model, settings, threshold, extracted: dict[str, np.ndarray]) -> list[dict]:
    """Part 2: the raw scan without a mask against the same scan with the reference mask."""
    rows = []
    for subject, (scan, reference) in scans.items():
        per_voxel = voxel_ml(scan)
        row = {"subject": subject}
        for run, mask in (("raw", None), ("reference_mask", reference)):
            analysis, seconds = timed(lambda: analyse_scan(scan, model, brain_mask=mask, settings=settings))
            flagged_ml = float(np.count_nonzero(analysis.mask_at(threshold.value))) * per_voxel
            row[run] = {
                "brain_source": analysis.brain.source,
                "brain_ml": analysis.brain.volume_ml,
                "flagged_ml": flagged_ml,
                "flagged_share_of_brain": flagged_ml / analysis.brain.volume_ml,
                "seconds": seconds,
            }
            if run == "raw":
                # The extraction is deterministic: the analysis must have used the mask of part 1.
                row["raw"]["same_mask_as_extraction"] = bool(np.array_equal(analysis.brain.mask, extracted[subject]))
        row["difference_share_of_brain"] = (
            (row["raw"]["flagged_ml"] - row["reference_mask"]["flagged_ml"]) / row["reference_mask"]["brain_ml"])
        rows.append(row)
        print(f"  findings: {subject} done", flush=True)
    return rows


def clinical_rows() -> list[dict]:
    """Part 3: the raw clinical scans, extracted; a refusal by the size checks is a result."""
    rows = []
    for patient, contrast in CLINICAL:
        with warnings.catch_warnings():
            # Tilted 2D acquisitions have oblique affines: a column says so instead of a warning each.
            warnings.simplefilter("ignore", ScanWarning)
            scan = read_nifti(DATA / f"mslub_longitudinal_raw/{patient}/{contrast}.nii.gz")
        row = {"scan": f"{patient} {contrast}", "shape": list(scan.data.shape),
               "spacing_mm": [round(value, 2) for value in scan.geometry.spacing],
               "oblique": scan.geometry.is_oblique}
        try:
            found, seconds = timed(lambda: find_brain(scan))
            row.update(source=found.source, volume_ml=found.volume_ml, seconds=seconds, refused=None)
        except ScanError as error:
            row.update(source=None, volume_ml=None, seconds=None, refused=str(error))
        rows.append(row)
        print(f"  clinical: {patient} {contrast} done", flush=True)
    return rows


def print_tables(extraction: list[dict], findings: list[dict], clinical: list[dict], threshold_name: str) -> None:
    print("\n| IXI subject (raw T1, 2 mm) | brain found | Dice vs reference | extracted mL | reference mL | s |"
          "\n|---|---|---|---|---|---|")
    for row in extraction:
        print(f"| {row['subject']} | {row['source']} | {row['dice']:.3f} | {row['extracted_ml']:.0f} | "
              f"{row['reference_ml']:.0f} | {row['seconds']:.1f} |")
    dices, seconds = [row["dice"] for row in extraction], [row["seconds"] for row in extraction]
    print(f"| mean (min) over {len(extraction)} | | {np.mean(dices):.3f} ({np.min(dices):.3f}) | "
          f"{np.mean([row['extracted_ml'] for row in extraction]):.0f} | "
          f"{np.mean([row['reference_ml'] for row in extraction]):.0f} | {np.mean(seconds):.1f} (max {np.max(seconds):.1f}) |")

    print(f"\n| IXI subject (healthy) | raw, no mask: flagged mL (share of brain) | with reference mask: flagged mL "
          f"(share of brain) | difference, share of brain | s per analysis (raw / mask) |"
          f"\n|---|---|---|---|---|")
    for row in findings:
        raw, reference = row["raw"], row["reference_mask"]
        print(f"| {row['subject']} | {raw['flagged_ml']:.1f} ({raw['flagged_share_of_brain']:.2%}) | "
              f"{reference['flagged_ml']:.1f} ({reference['flagged_share_of_brain']:.2%}) | "
              f"{row['difference_share_of_brain']:+.2%} | {raw['seconds']:.1f} / {reference['seconds']:.1f} |")
    differences = [abs(row["difference_share_of_brain"]) for row in findings]
    print(f"| mean over {len(findings)} | {np.mean([row['raw']['flagged_ml'] for row in findings]):.1f} "
          f"({np.mean([row['raw']['flagged_share_of_brain'] for row in findings]):.2%}) | "
          f"{np.mean([row['reference_mask']['flagged_ml'] for row in findings]):.1f} "
          f"({np.mean([row['reference_mask']['flagged_share_of_brain'] for row in findings]):.2%}) | "
          f"largest {max(differences):.2%} | "
          f"{np.mean([row['raw']['seconds'] for row in findings]):.1f} / "
          f"{np.mean([row['reference_mask']['seconds'] for row in findings]):.1f} |")
    within = sum(difference <= ACCEPTED_DIFFERENCE for difference in differences)
    print(f"flagged at {threshold_name}; difference within {ACCEPTED_DIFFERENCE:.0%} of the brain: "
          f"{within} of {len(findings)} subjects")
    mismatched = [row["subject"] for row in findings if not row["raw"]["same_mask_as_extraction"]]
    if mismatched:
        print(f"NOTE: the analysis extracted another brain than find_brain alone for {', '.join(mismatched)}")
    others = [row["subject"] for row in findings if row["raw"]["brain_source"] != EXTRACTED]
    if others:
        print(f"NOTE: the raw scan's brain was not extracted for {', '.join(others)}")

    if not clinical:
        return
    print("\n| raw clinical scan | grid (spacing mm) | brain found | volume mL | s |\n|---|---|---|---|---|")
    for row in clinical:
        grid = (f"{'×'.join(map(str, row['shape']))} ({'×'.join(f'{value:g}' for value in row['spacing_mm'])})"
                + (", oblique" if row["oblique"] else ""))
        if row["refused"] is not None:
            print(f"| {row['scan']} | {grid} | refused: {row['refused']} | – | – |")
        else:
            print(f"| {row['scan']} | {grid} | {row['source']} | {row['volume_ml']:.0f} | {row['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model name or checkpoint (default: the bundled default)")
    parser.add_argument("--subjects", type=int, default=6, help="held-out IXI test subjects")
    parser.add_argument("--no-clinical", dest="clinical", action="store_false",
                        help="leave out the raw clinical MS scans")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    model_path, model, metadata, settings, threshold = model_as_users_run_it(args.model)
    scans = read_subjects(ixi_subjects("test", str(model_path))[: args.subjects])
    _, load_seconds = timed(lambda: networks("cpu"))  # weights read, hashed and loaded: once a session
    # One extraction and one analysis before the timed ones, so one-off setup (files into the
    # page cache, lazy initialisation) shows here and not in the first row of a table.
    first, first_reference = next(iter(scans.values()))
    _, first_extraction = timed(lambda: find_brain(first))
    _, first_analysis = timed(lambda: analyse_scan(first, model, settings=settings, brain_mask=first_reference))
    machine = (f"{platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
               f"threads {torch.get_num_threads()}")
    print(f"machine: {machine}; extractor {EXTRACTOR} (networks loaded in {load_seconds:.1f} s, once); "
          f"model {model_path.name}, scorer {settings.scorer}, threshold {threshold.name} = {threshold.value:.4g}; "
          f"first calls, not in the tables: extraction {first_extraction:.1f} s, analysis {first_analysis:.1f} s")

    start = time.perf_counter()
    extraction, extracted = extraction_rows(scans)
    findings = finding_rows(scans, model, settings, threshold, extracted)
    clinical = clinical_rows() if args.clinical else []
    print_tables(extraction, findings, clinical, threshold.name)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "extractor": EXTRACTOR, "network_load_seconds": load_seconds,
            "first_call_seconds": {"extraction": first_extraction, "analysis": first_analysis},
            "model": model_path.name, "scorer": settings.scorer,
            "threshold": {"name": threshold.name, "value": threshold.value},
            "extraction": extraction, "findings": findings, "clinical": clinical,
        }, indent=2))


if __name__ == "__main__":
    main()
