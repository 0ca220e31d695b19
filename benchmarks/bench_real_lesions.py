"""Real lesions drawn by hand: the validation benchmark that models, scorers, thresholds and
defaults are chosen by.

Run by hand (one core, so a training run beside it keeps its CPU):
    OMP_NUM_THREADS=1 NAPARI_BRAIN_UAD_DATA=../shared/data .venv/bin/python benchmarks/bench_real_lesions.py \\
        [--model NAME|PATH ...] [--contrast FLAIR|T2|T1 ...] [--scorer NAME ...] \\
        [--brain both|given|extracted] [--cases ms_clinical wmh_clinical mslub brats2013] \\
        [--exclude-case ms_clinical/104670 ...] [--check] [--json results.json]

Cases (``--cases`` picks sets; each case is one scan of one contrast with its lesion mask):

- ``ms_clinical``: five clinical MS patients, FLAIR, T2 and T1 (skull on, 2D slices of 6-8 mm),
  hand-drawn lesion masks and a brain mask;
- ``wmh_clinical``: two clinical FLAIRs with white-matter hyperintensities (skull-stripped);
- ``mslub``: MSLUB patient 26, T1, T2 and FLAIR (skull-stripped, 1 mm, MNI);
- ``brats2013``: three glioma FLAIRs (whole tumour = label > 0; z-scored, with a brain mask).

Each model (default: the bundled one) is run on the cases of its contrasts (``--contrast``;
default: the contrast of its card's model space) as a user runs it: the raw file read with
``scan_reader.read_scan``, the settings every door gives it (``AnalysisSettings.for_model``, CPU), the
steps of ``analysis.analyse_scan``. Each case gives up to two rows: brain **extracted** (no
mask given: the tool finds it, which for a skull-stripped scan means its non-background voxels)
and brain **given** (the case's brain mask, where it has one).

Rows of a table:

- ``<model> · <scorer>``: the model's filtered map (5³ median, eroded brain) on the scan's grid,
  for each ``--scorer`` (default: the model's own); one reconstruction serves every scorer that
  asks for the same number of them;
- ``threshold (model space) · <model>``: the learning-free baseline, the model-space image
  itself (``bright``, FLAIR and T2) or 1 − image inside the brain (``dark``, T1), put through
  the same post-processing and back to the scan's grid as the model's map. It needs no network,
  but its model space is the model's (spacing, crop, N4 or not), so every model has its own;
- ``threshold (native, 5×5) · <model>``: the baseline as the issue that asked for this
  benchmark measured it: the scan's own intensities inside the same brain mask, 1st-99th
  percentile to [0, 1] (1 − that for T1), a 5×5 median in the plane of the two finest axes,
  evaluated in the same eroded region as the model's map.

Columns, each the mean over the contrast's cases (per case below): [Dice] (best Dice over all
thresholds), AUPRC, the Dice of the exported mask at the model's healthy-percentile threshold
for the scorer (``thresholds.default_threshold``; "–" when the card has none, and for the
baselines, which have none), and "flagged": the share of the evaluated region outside the
lesion mask whose filtered score is above that threshold (false alarms). All on each scan's own
grid inside the eroded brain (``evaluation.evaluate_filtered``). A "given" mean covers only the
cases that have a brain mask (``ms_clinical``, ``brats2013``), so compare it with the
"extracted" mean of the same sets (the table by set). The first line printed says the
machine, its CPUs and torch; the time each case took is printed last. Nothing is written unless
``--json``. ``--check`` also runs ``analyse_scan`` itself on each model's first case (each brain
choice) and exits non-zero unless its filtered map is the one computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_brain_uad.brain_mask import BrainMask, find_brain
from napari_brain_uad.evaluation import LabelledCase, evaluate_analysis, evaluate_filtered, mean_row, read_case
from napari_brain_uad.nifti import ScanError
from napari_brain_uad.model_card import default_scorer
from napari_brain_uad.postprocess import FilteredMap

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))

CONTRASTS = ("FLAIR", "T2", "T1")
# Each set: the contrasts it has, its lesion mask's file and its brain mask's (None: none, the
# scans are skull-stripped). File names are "<name>.nii.gz" in each case's folder.
SETS = {
    "ms_clinical": (("FLAIR", "T2", "T1"), "lesionmask", "brainmask"),
    "wmh_clinical": (("FLAIR",), "lesionmask", None),
    "mslub": (("FLAIR", "T2", "T1"), "lesionmask", None),
    "brats2013": (("FLAIR",), "tumourmask", "brainmask"),
}
# Lesions are bright on FLAIR and T2 and dark on T1: the direction the baselines look in.
BRIGHT_CONTRASTS = ("FLAIR", "T2")
EXTRACTED_BRAIN, GIVEN_BRAIN = "extracted", "given"
NATIVE_MEDIAN = 5  # in-plane size of the native baseline's median


@dataclass(frozen=True)
class Case:
    """One scan of one contrast with its lesion mask (and brain mask, if the set has one)."""

    set: str
    patient: str
    contrast: str
    image: Path
    lesion: Path
    brain_mask: Path | None

    @property
    def name(self) -> str:
        return f"{self.set}/{self.patient}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.contrast}"

    @property
    def bright(self) -> bool:
        return self.contrast in BRIGHT_CONTRASTS


def find_cases(data: Path, sets: Iterable[str] = tuple(SETS), exclude: Sequence[str] = ()) -> list[Case]:
    """Every case of ``sets`` under ``data`` whose scan and lesion mask exist, set by set and
    patient by patient. ``exclude`` drops cases by ``set/patient``, by patient, or by label
    (``set/patient CONTRAST``)."""
    cases = []
    for set_name in sets:
        contrasts, lesion_name, brain_name = SETS[set_name]
        folder = data / set_name
        patients = sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
        for patient in patients:
            lesion = patient / f"{lesion_name}.nii.gz"
            brain = patient / f"{brain_name}.nii.gz" if brain_name else None
            for contrast in contrasts:
                image = patient / f"{contrast}.nii.gz"
                if not (image.is_file() and lesion.is_file()):
                    continue
                case = Case(set_name, patient.name, contrast, image, lesion,
                            brain if brain is not None and brain.is_file() else None)
                if not {case.name, case.patient, case.label} & set(exclude):
                    cases.append(case)
    return cases


def in_plane_axes(spacing: Sequence[float]) -> tuple[int, int]:
    """The two axes with the finest voxels: the plane a 2D acquisition's slices lie in (for an
    isotropic scan, the first two)."""
    first, second = np.argsort(np.asarray(spacing, dtype=float), kind="stable")[:2]
    return int(first), int(second)


def native_intensity_baseline(data: np.ndarray, brain: np.ndarray, region: np.ndarray, spacing: Sequence[float],
                              *, bright: bool = True) -> FilteredMap:
    """The learning-free map on the scan's own grid: intensities inside ``brain`` mapped from
    their 1st-99th percentile to [0, 1] (for dark lesions, 1 − that), then a 5×5 median in the
    plane of the two finest axes (none across thick slices, which would mix distant tissue),
    kept only in ``region`` — the model's eroded region, so both are scored on the same voxels.
    The region is taken as given (``iterations`` 0: nothing is eroded here)."""
    brain = np.asarray(brain, dtype=bool)
    region = np.asarray(region, dtype=bool) & brain
    values = np.asarray(data, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(values[brain], (1.0, 99.0)))
    if high <= low:
        raise ScanError(f"the brain has no contrast (all voxels are {low:g})")
    normalised = np.clip((values - low) / (high - low), 0.0, 1.0)
    if not bright:
        normalised = 1.0 - normalised
    # 0 outside the brain before the median, as in model space: the skull must not leak in.
    normalised = np.where(brain, normalised, 0.0).astype(np.float32)
    size = [1, 1, 1]
    for axis in in_plane_axes(spacing):
        size[axis] = NATIVE_MEDIAN
    filtered = ndimage.median_filter(normalised, size=size)
    return FilteredMap(np.where(region, filtered, np.float32(0)).astype(np.float32), region, brain,
                       tuple(float(s) for s in spacing), True, 0)


@dataclass
class Model:
    """A model as users run it, and what this run asks of it."""

    name: str
    path: Path
    network: object  # models.ReconstructionModel
    metadata: dict
    contrasts: tuple[str, ...]
    settings: dict[str, object] = field(default_factory=dict)  # scorer -> AnalysisSettings


def load_models(names: Sequence[str], contrasts: Sequence[str] | None, scorers: Sequence[str] | None,
                device: str) -> list[Model]:
    """Each ``--model`` resolved as every door resolves it, with its scorers' settings; scorers a
    model cannot feed (several reconstructions from an autoencoder, maps it does not make) are
    left out for it with a note."""
    from napari_brain_uad.analysis import AnalysisSettings
    from napari_brain_uad.model_registry import default_model_name, resolve_model
    from napari_brain_uad.models import load_model
    from napari_brain_uad.scoring import SCORERS

    models = []
    for name in names:
        name = name or default_model_name()
        path = resolve_model(name)
        network, metadata = load_model(path)
        modality = (metadata.get("model_space") or {}).get("modality")
        chosen = tuple(contrasts) if contrasts else ((modality,) if modality in CONTRASTS else CONTRASTS)
        # A registry name names the model; a checkpoint of one's own is named by its run folder too.
        label = name if not Path(name).suffix else f"{Path(path).parent.name}/{Path(path).stem}"
        model = Model(label, Path(path), network, metadata, chosen)
        for scorer in scorers or [default_scorer(metadata)]:
            needs = SCORERS[scorer]
            if needs.needs_samples and not network.samples_differ:
                print(f"note: {model.name} skips {scorer}: its reconstructions never differ")
                continue
            if not needs.usable_with(network.extra_maps):
                print(f"note: {model.name} skips {scorer}: it makes no {', '.join(needs.needs_maps)} map")
                continue
            model.settings[scorer] = AnalysisSettings.for_model(metadata, scorer=scorer, device=device)
        if model.settings:
            models.append(model)
    return models


def baseline_analysis(scan, volume, brain: BrainMask, model: Model, bright: bool):
    """The model-space baseline as a ScanAnalysis: the image (or 1 − image inside the brain) in
    place of the score map, through the same ``analysis_from_model_space`` and the model's
    space, with the standard post-processing of the papers (median 5³, eroded brain: the
    residual's), whatever the model's own scorer does after (SADM adds its segmentation, PHANES
    filters nothing). The image stands in for the reconstruction, which nothing here reads."""
    from napari_brain_uad.analysis import AnalysisSettings, analysis_from_model_space

    image = volume.image
    score_map = image if bright else np.where(volume.brain_mask, 1.0 - image, 0.0).astype(np.float32)
    settings = AnalysisSettings(scorer="residual")
    return analysis_from_model_space(
        scan, volume, brain, settings, score_map=score_map, mean_reconstruction=image, spread=None,
        model_voxel_ml=float(model.network.spec.spacing_mm) ** 3 / 1000.0)


def flagged_outside_lesions(filtered: FilteredMap, truth: np.ndarray, threshold: float | None) -> float | None:
    """The share of the evaluated region outside the lesions whose filtered score is above the
    threshold (None without one): false alarms on the healthy tissue of a lesioned scan."""
    if threshold is None:
        return None
    healthy = filtered.region & ~np.asarray(truth, dtype=bool)
    if not healthy.any():
        return float("nan")
    return float(np.count_nonzero(filtered.values[healthy] > np.float64(threshold)) / np.count_nonzero(healthy))


def case_row(case: Case, brain_choice: str, brain: BrainMask, row: str, model: Model, scorer: str | None,
             evaluation, flagged: float | None, threshold) -> dict:
    return {
        "set": case.set, "case": case.name, "contrast": case.contrast, "brain": brain_choice,
        "brain_source": brain.source, "brain_ml": brain.volume_ml, "row": row, "model": model.name,
        "scorer": scorer, "lesion_voxels": evaluation.lesion_voxels, "prevalence": evaluation.prevalence,
        "best_dice": evaluation.best_dice, "auprc": evaluation.auprc,
        "healthy_threshold": None if threshold is None else threshold.value,
        "dice_at_healthy_threshold": evaluation.dice, "flagged": flagged,
    }


def evaluate_case(case: Case, models: list[Model], brain_choices: Sequence[str], device: str,
                  check: set[str]) -> tuple[list[dict], list[dict], list[str]]:
    """Every row of one case: (rows, timings, problems). ``check`` holds the names of models whose
    maps are still to be compared with ``analyse_scan`` itself, for each brain choice of this
    case; they are taken out of it once done."""
    from napari_brain_uad.preprocess import to_model_space
    from napari_brain_uad.analysis import analyses_in_model_space
    from napari_brain_uad.thresholds import default_threshold

    rows, timings, problems = [], [], []
    checked = set()
    start = time.perf_counter()
    scan, truth, given = read_case(LabelledCase(case.image, case.lesion, case.brain_mask, case.label))
    reading_seconds = time.perf_counter() - start
    extraction_device = "cuda" if device.startswith("cuda") else "cpu"
    for brain_choice in brain_choices:
        if brain_choice == GIVEN_BRAIN and given is None:
            continue
        # Why the brain is found here and not inside analyse_scan: analyse_scan finds it anew on
        # every call (a deepbet extraction, 5-20 s on this CPU) and runs the network for one
        # scorer only. Passing the found mask back as a "given" one would not do either: a given
        # mask is used on the native grid as it is, a found one is first cut to the model-space
        # mask (analysis_from_model_space), so the rows would no longer be what a user gets.
        # So the loop runs analyse_scan's own steps with its own functions — find_brain once per
        # scan and brain choice, to_model_space once per model space, and the rest in
        # analysis.analyses_in_model_space (the network once per group of scorers), which
        # analyse_scan itself calls — and --check proves the result is analyse_scan's, map for map.
        start = time.perf_counter()
        try:
            brain = find_brain(scan, given if brain_choice == GIVEN_BRAIN else None, device=extraction_device)
        except ScanError as error:
            problems.append(f"{case.label}, brain {brain_choice}: {error}")
            continue
        brain_seconds = time.perf_counter() - start
        volumes: dict = {}  # model space spec -> ModelSpaceVolume
        baselines: dict = {}  # model space spec -> (model-space baseline analysis, native baseline map)
        for model in models:
            if case.contrast not in model.contrasts:
                continue
            timing = {"case": case.label, "brain": brain_choice, "reading": reading_seconds,
                      "finding the brain": brain_seconds, "model": model.name}
            start = time.perf_counter()
            spec = model.network.spec
            try:
                if spec not in volumes:
                    volumes[spec] = to_model_space(scan, brain_mask=brain.mask, spec=spec)
                timing["model space"] = time.perf_counter() - start
                start = time.perf_counter()
                analyses = analyses_in_model_space(scan, volumes[spec], brain, model.network, model.settings)
                timing["network and scoring"] = time.perf_counter() - start
            except ScanError as error:
                problems.append(f"{case.label}, brain {brain_choice}, {model.name}: {error}")
                continue
            for scorer, analysis in analyses.items():
                start = time.perf_counter()
                threshold = default_threshold(model.metadata, scorer)
                value = None if threshold is None else threshold.value
                evaluation = evaluate_analysis(analysis, truth, threshold=value, name=case.label)
                rows.append(case_row(case, brain_choice, brain, f"{model.name} · {scorer}", model, scorer,
                                     evaluation, flagged_outside_lesions(analysis.filtered, truth, value), threshold))
                timing["evaluation"] = timing.get("evaluation", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            if spec not in baselines:
                in_model_space = baseline_analysis(scan, volumes[spec], brain, model, case.bright)
                # The model's eroded region on the scan's grid (the same for every scorer).
                region = next(iter(analyses.values())).filtered.region
                native = native_intensity_baseline(scan.data, in_model_space.brain_mask, region,
                                                   scan.geometry.spacing, bright=case.bright)
                baselines[spec] = (in_model_space, native)
            in_model_space, native = baselines[spec]
            direction = "bright" if case.bright else "dark"
            for row, filtered in ((f"threshold (model space, {direction}) · {model.name}", in_model_space.filtered),
                                  (f"threshold (native, 5×5, {direction}) · {model.name}", native)):
                evaluation = evaluate_filtered(filtered, truth, name=case.label)
                rows.append(case_row(case, brain_choice, brain, row, model, None, evaluation, None, None))
            timing["baselines"] = time.perf_counter() - start
            timings.append(timing)
            if model.name in check:
                checked.add(model.name)
                problems.extend(compare_with_analyse_scan(scan, model, given if brain_choice == GIVEN_BRAIN else None,
                                                          analyses, case.label, brain_choice))
    check.difference_update(checked)  # each brain choice of a model's first case is checked
    return rows, timings, problems


def compare_with_analyse_scan(scan, model: Model, given, analyses: dict, label: str, brain_choice: str) -> list[str]:
    """``analyse_scan`` itself on the same scan with the first scorer's settings: its filtered map
    must be the one computed here (a difference means the brain or model space found once and
    shared here is not what analyse_scan finds)."""
    from napari_brain_uad.analysis import analyse_scan

    scorer, settings = next(iter(model.settings.items()))
    reference = analyse_scan(scan, model.network, brain_mask=given, settings=settings).filtered
    ours = analyses[scorer].filtered
    same = np.array_equal(reference.region, ours.region) and np.array_equal(reference.values, ours.values)
    print(f"check: {model.name} · {scorer} on {label} (brain {brain_choice}) "
          f"{'is' if same else 'is NOT'} analyse_scan's map", flush=True)
    if same:
        return []
    difference = float(np.abs(reference.values - ours.values).max())
    return [f"check failed: {model.name} · {scorer} on {label}, brain {brain_choice}: the filtered map differs "
            f"from analyse_scan's (largest difference {difference:.3g})"]


def cell(value, form: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(value, form)


def summary(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    """The mean over cases of each group of rows with the same ``keys``, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    means = []
    for group_key, members in groups.items():
        numbers = [{name: member[name] for name in ("best_dice", "auprc", "dice_at_healthy_threshold", "flagged",
                                                    "prevalence")} for member in members]
        mean = mean_row(numbers)
        mean.pop("case")  # mean_row's "mean" label; the keys say what the row is
        means.append({**dict(zip(keys, group_key)), **mean})
    return means


def print_tables(rows: list[dict], timings: list[dict]) -> None:
    for contrast in CONTRASTS:
        of_contrast = [row for row in rows if row["contrast"] == contrast]
        if not of_contrast:
            continue
        cases = sorted({row["case"] for row in of_contrast})
        print(f"\n## {contrast}: {len(cases)} cases ({', '.join(cases)})\n")
        print("| row | brain | cases | [Dice] | AUPRC | Dice at healthy thr. | flagged |\n"
              "|---|---|---|---|---|---|---|")
        for mean in summary(of_contrast, ("row", "brain")):
            print(f"| {mean['row']} | {mean['brain']} | {mean['cases']} | {cell(mean.get('best_dice'))} | "
                  f"{cell(mean.get('auprc'))} | {cell(mean.get('dice_at_healthy_threshold'))} | "
                  f"{cell(mean.get('flagged'), '.1%')} |")
        sets = {row["set"] for row in of_contrast}
        if len(sets) > 1:
            print(f"\n{contrast} by set ([Dice] / AUPRC):\n\n| row | brain | "
                  + " | ".join(sorted(sets)) + " |\n|---|---|" + "---|" * len(sets))
            by_set = {(mean["row"], mean["brain"], mean["set"]): mean
                      for mean in summary(of_contrast, ("row", "brain", "set"))}
            for mean in summary(of_contrast, ("row", "brain")):
                cells = [by_set.get((mean["row"], mean["brain"], name)) for name in sorted(sets)]
                print(f"| {mean['row']} | {mean['brain']} | " + " | ".join(
                    "–" if found is None else f"{cell(found.get('best_dice'))} / {cell(found.get('auprc'))}"
                    for found in cells) + " |")
    print("\n## Per case\n\n| case | brain (found as) | row | lesion voxels | [Dice] | AUPRC | Dice at healthy thr. | "
          "flagged |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} {row['contrast']} | {row['brain']} ({row['brain_source']}, {row['brain_ml']:.0f} mL) | "
              f"{row['row']} | {row['lesion_voxels']} | {cell(row['best_dice'])} | {cell(row['auprc'])} | "
              f"{cell(row['dice_at_healthy_threshold'])} | {cell(row['flagged'], '.1%')} |")
    print("\n## Time per case (s)\n\nReading and finding the brain are done once per case and brain, and shared "
          "by its models.\n\n| case | brain | reading | finding the brain | model | model space | "
          "network, scoring, post-processing | evaluation | baselines (same) |\n|---|---|---|---|---|---|---|---|---|")
    for timing in timings:
        print(f"| {timing['case']} | {timing['brain']} | {timing['reading']:.1f} | {timing['finding the brain']:.1f} | "
              f"{timing['model']} | "
              f"{timing.get('model space', 0.0):.1f} | {timing.get('network and scoring', 0.0):.1f} | "
              f"{timing.get('evaluation', 0.0):.1f} | {timing.get('baselines', 0.0):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append",
                        help="a model name or checkpoint (repeatable; default: the bundled one)")
    parser.add_argument("--contrast", action="append", choices=CONTRASTS,
                        help="contrasts to run each model on (repeatable; default: its card's)")
    parser.add_argument("--scorer", action="append", help="scorers (repeatable; default: each model's own)")
    parser.add_argument("--brain", choices=("both", GIVEN_BRAIN, EXTRACTED_BRAIN), default="both")
    parser.add_argument("--cases", nargs="+", choices=list(SETS), default=list(SETS), help="sets of cases")
    parser.add_argument("--exclude-case", action="append", default=[],
                        help="leave out a case: set/patient, patient, or 'set/patient CONTRAST' (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true",
                        help="also run analyse_scan on each model's first case (each brain) and require the same map")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()

    import torch

    from napari_brain_uad.scoring import SCORERS

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device {args.device}", flush=True)
    unknown = [name for name in args.scorer or [] if name not in SCORERS]
    if unknown:
        parser.error(f"unknown scorer(s) {', '.join(unknown)}; known: {', '.join(SCORERS)}")
    models = load_models(args.model or [None], args.contrast, args.scorer, args.device)
    cases = [case for case in find_cases(DATA, args.cases, args.exclude_case)
             if any(case.contrast in model.contrasts for model in models)]
    if not cases:
        raise SystemExit(f"no case of {', '.join(args.cases)} in {DATA} for the contrasts asked")
    brain_choices = (EXTRACTED_BRAIN, GIVEN_BRAIN) if args.brain == "both" else (args.brain,)
    print(f"{len(cases)} cases from {DATA}; models: "
          + "; ".join(f"{model.name} ({', '.join(model.settings)}; {', '.join(model.contrasts)})" for model in models),
          flush=True)

    rows, timings, problems = [], [], []
    check = {model.name for model in models} if args.check else set()
    for case in cases:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case_rows, case_timings, case_problems = evaluate_case(case, models, brain_choices, args.device, check)
        rows += case_rows
        timings += case_timings
        problems += case_problems
        notes = sorted({str(warning.message) for warning in caught
                        if not issubclass(warning.category, DeprecationWarning)})
        print(f"{case.label}: {time.perf_counter() - start:.1f} s" + "".join(f"\n  warning: {note}" for note in notes),
              flush=True)
        for problem in case_problems:
            print(f"  problem: {problem}", flush=True)
    if not rows:
        print("\nno rows: a given brain needs cases with a brain mask (ms_clinical, brats2013)")
    print_tables(rows, timings)
    if problems:
        print("\nproblems:\n" + "\n".join(f"- {problem}" for problem in problems))
    if args.json:
        document = {
            "machine": {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device},
            "data": str(DATA), "arguments": vars(args),
            "models": [{"name": model.name, "path": str(model.path), "contrasts": list(model.contrasts),
                        "scorers": {scorer: {"samples": settings.samples,
                                             "noise_levels": list(settings.noise_levels or []) or None,
                                             "median": settings.median, "seed": settings.seed}
                                    for scorer, settings in model.settings.items()}} for model in models],
            "means": {contrast: summary([row for row in rows if row["contrast"] == contrast], ("row", "brain"))
                      for contrast in CONTRASTS},
            "means_by_set": summary(rows, ("contrast", "set", "row", "brain")),
            "cases": rows, "timings": timings, "problems": problems,
        }
        Path(args.json).write_text(json.dumps(document, indent=1, default=float) + "\n")
    if any(problem.startswith("check failed") for problem in problems):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
