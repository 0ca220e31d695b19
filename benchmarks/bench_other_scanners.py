"""False alarms and typicality on scans from other scanners, as users run the models.

Run by hand (about a minute per model and scorer on a 2-core CPU):
    .venv/bin/python benchmarks/bench_other_scanners.py [--model NAME|PATH ...] [--lesion-direction]
        [--json results.json]

Every scan goes through ``analysis.analyse_scan`` with the settings every door gives the model
(its default scorer; with ``--lesion-direction`` also the one-way residual of its contrast),
on the scan's own grid, and is reported with:

- **flagged**: the share of the eroded brain above the model's healthy-percentile threshold for
  the scorer — on healthy scans of the training scanner it should be near 1 %; elsewhere it is
  what a user sees as false alarms. For the MSLUB patient the expert's lesions are left out
  (the share of the brain *without* lesions that is flagged); the raw clinical MS scans have no
  lesion mask, so their share includes their lesions (an upper bound of the false alarms).
- **typicality**: the scan's typicality score (``typicality``), where the model stores one.

Scans: two held-out healthy IXI T1 (the training scanner), IXI002 T1 (another hospital, healthy,
skull-stripped), the MSLUB patient 26 T1 (another scanner, skull-stripped, N4-corrected,
lesion mask) and the two raw clinical MS T1W scans (skull on: the brain is extracted; 3 mm
slices). Nothing is written unless --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.scan_reader import read_scan
from napari_brain_uad.model_card import lesion_direction_scorer
from napari_brain_uad.model_registry import resolve_model
from napari_brain_uad.models import load_model
from napari_brain_uad.thresholds import default_threshold
from napari_brain_uad.typicality import assess

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))

# (name, scan, brain mask or None, lesion mask or None)
SCANS = (
    ("IXI049 (training scanner, held out)", "ixi_t1/IXI049-HH-1358_T1.nii.gz", "ixi_t1/brainmask/IXI049-HH-1358_brainmask.nii.gz", None),
    ("IXI105 (training scanner, held out)", "ixi_t1/IXI105-HH-1471_T1.nii.gz", "ixi_t1/brainmask/IXI105-HH-1471_brainmask.nii.gz", None),
    ("IXI002 (other hospital, healthy)", "ixi002/T1.nii.gz", "ixi002/T1_brainmask.nii.gz", None),
    ("MSLUB 26 (non-lesion brain)", "mslub/patient26/T1.nii.gz", None, "mslub/patient26/lesionmask.nii.gz"),
    ("clinical MS 01 T1W (raw)", "mslub_longitudinal_raw/patient01/T1W.nii.gz", None, None),
    ("clinical MS 04 T1W (raw)", "mslub_longitudinal_raw/patient04/T1W.nii.gz", None, None),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model names or checkpoints (default: the bundled default)")
    parser.add_argument("--lesion-direction", action="store_true", help="also the one-way residual of the contrast")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    scans = [(name, read_scan(DATA / scan), read_scan(DATA / brain).data > 0 if brain else None,
              read_scan(DATA / lesion).data > 0 if lesion else None) for name, scan, brain, lesion in SCANS]
    rows = []
    for name_or_path in args.model or [None]:
        path = resolve_model(name_or_path)
        model, metadata = load_model(path)
        scorers = [metadata.get("default_scorer")]
        if args.lesion_direction and lesion_direction_scorer(metadata):
            scorers.append(lesion_direction_scorer(metadata))
        for scorer in scorers:
            settings = AnalysisSettings.for_model(metadata, scorer=scorer, device="cpu")
            threshold = default_threshold(metadata, scorer)
            for case, scan, brain, lesion in scans:
                analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings)
                filtered = analysis.filtered
                region = filtered.region if lesion is None else filtered.region & ~lesion
                flagged = None if threshold is None else float((filtered.values[region] > threshold.value).mean())
                typical = assess(filtered, settings, metadata)
                rows.append({"model": str(name_or_path or path.stem), "scorer": scorer, "scan": case,
                             "flagged": flagged, "typicality": None if typical is None else typical.score,
                             "brain_ml": float(analysis.brain.volume_ml)})
                print(f"  {rows[-1]}", flush=True)

    print("\n| model | scorer | scan | flagged at healthy threshold | typicality |\n|---|---|---|---|---|")
    for row in rows:
        flagged = "–" if row["flagged"] is None else f"{row['flagged']:.1%}"
        typical = "–" if row["typicality"] is None else f"{row['typicality']:.1f}"
        print(f"| {row['model']} | {row['scorer']} | {row['scan']} | {flagged} | {typical} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
