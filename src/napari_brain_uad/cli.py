"""``brain-uad``: score scans from the command line with the same core as the widget.

    brain-uad score SCAN.nii.gz|DICOM_FOLDER [--series UID] --out-map MAP.nii.gz [--model NAME|PATH] \\
        [--brain-mask MASK.nii.gz] [--scorer NAME] [--samples N] [--noise-levels 250 500 750] \\
        [--out-recon RECON.nii.gz] [--out-mask MASK.nii.gz [--threshold VALUE|NAME]]
    brain-uad score A.nii.gz B.nii.gz …|FOLDER|LIST.csv|BIDS_DATASET --out-dir DIR [--workers N] \\
        [--bids-suffix T1w] [--derivatives FOLDER] [--threshold VALUE|NAME] [--overwrite]
    torchrun --nproc_per_node N -m napari_brain_uad.cli score … --out-dir DIR
    brain-uad evaluate --images A.nii.gz B.nii.gz --masks A_lesions.nii.gz B_lesions.nii.gz \\
        [--brain-masks ...] [--model NAME|PATH] [--scorer NAME] [--json RESULTS.json]
    brain-uad evaluate LIST.csv|BIDS_DATASET [--bids-suffix T1w] [--derivatives FOLDER] [...]
    brain-uad models [NAME|PATH ...]

Without ``--model`` each scan gets the registry's model for its contrast, guessed from its name
(and a DICOM series' description; ``model_registry`` owns the rule), else the bundled default
model, with the scorer it was calibrated for; a line on stderr says which model and why.
With ``--out-dir`` many scans are scored into one folder with a summary, resumably and in
parallel; ``cohort`` runs that (``cohort_records`` keeps its records and summary) and says how.
Every door names and writes a scan's files through ``results``.

Every output is written on the input's own grid with its affine, to a temporary name renamed
when complete, and never over an existing file unless ``--overwrite``. A problem with the
input or the settings (a ``BrainUADError``) ends with one line on stderr and exit status 2 and
leaves no output behind; anything else is a bug: its traceback goes to the log (stderr) and the
exit status is 1. Thresholds and evaluation follow ``thresholds`` and ``evaluation``, as in the
widget.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

from .errors import BrainUADError, OutputExists, SettingsError, internal_error_message
from .scoring import SCORERS
from .thresholds import resolve_threshold


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brain-uad", description="Unsupervised anomaly detection in brain MRI.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="anomaly map (and reconstruction, mask) of one scan, or of a cohort "
                                "with --out-dir")
    score.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="the scan: a .nii/.nii.gz file, or a folder holding a DICOM series; with --out-dir, "
                       "any number of scans, folders of scans, CSV lists (columns scan, brain_mask, id) or BIDS "
                       "datasets")
    score.add_argument("--series", metavar="UID", help="the DICOM series to read when the folder holds several "
                       "(default: the one with the most slices)")
    _model_arguments(score)
    score.add_argument("--brain-mask", help="brain mask on the scan's grid (default: a skull-stripped scan's "
                       "non-background voxels, else the brain extracted from the scan)")
    score.add_argument("--out-map", help="write the anomaly map here")
    score.add_argument("--out-recon", help="write the pseudo-healthy reconstruction here")
    score.add_argument("--out-mask", help="write the binary anomaly mask here")
    score.add_argument("--out-brain-mask", help="write the brain mask here (the one given, the skull-stripped scan's, or the extracted one), to check or correct it")
    score.add_argument("--threshold", help="a number, or the name of a threshold stored with the model "
                       "(default: the model's healthy-percentile threshold for the scorer)")
    score.add_argument("--min-size-ml", type=float, help="drop findings up to this volume (default: 7 model voxels)")
    score.add_argument("--out-dir", help="score every scan given into this folder, named after each scan's id, "
                       "with summary.csv and summary.json; scans already done with the same model and settings "
                       "are skipped")
    score.add_argument("--workers", type=int, default=1, help="with --out-dir: processes scoring scans at once, "
                       "each loading the model once (default 1)")
    score.add_argument("--threads", type=int, help="with --out-dir: threads per process (default: the cores shared "
                       "out among the processes)")
    _cohort_source_arguments(score)
    score.add_argument("--overwrite", action="store_true", help="replace existing output files")
    score.add_argument("--quiet", action="store_true", help="no progress on stderr")

    evaluate = commands.add_parser("evaluate", help="[Dice], Dice at a threshold, AUPRC and l1-ratio on scans with lesion masks")
    evaluate.add_argument("sources", nargs="*", metavar="LIST",
                          help="a CSV list (columns scan, lesion_mask, brain_mask, id) or a BIDS dataset whose "
                          "derivatives hold *_label-lesion_mask (and *_desc-brain_mask) files; or use --images")
    evaluate.add_argument("--images", nargs="+",
                          help="scans with lesions (NIfTI files or folders each holding one DICOM series)")
    evaluate.add_argument("--masks", nargs="+", help="their lesion masks, in the same order")
    evaluate.add_argument("--brain-masks", nargs="+", help="their brain masks (omit for skull-stripped scans)")
    _model_arguments(evaluate)
    evaluate.add_argument("--threshold", help="threshold for the Dice column: a number or a stored name "
                          "(default: the model's healthy-percentile threshold for the scorer, if any)")
    _cohort_source_arguments(evaluate)
    evaluate.add_argument("--json", help="also write the results here as JSON")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    evaluate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    calibrate = commands.add_parser(
        "calibrate", help="calibrate a model on a few healthy scans of your scanner: a copy with its own healthy "
        "threshold and typicality, written beside your data")
    calibrate.add_argument("--model", help="a model name or checkpoint file (default: the bundled model)")
    calibrate.add_argument("--healthy", nargs="+", required=True, metavar="SCANS",
                           help="healthy scans of your scanner, raw or skull-stripped: files, folders of scans, CSV "
                           "lists (columns scan, brain_mask) or BIDS datasets; at least 3")
    _cohort_source_arguments(calibrate)
    calibrate.add_argument("--output", help="the calibrated copy (.safetensors; default: "
                           "<model>-calibrated.safetensors beside the first healthy scans)")
    calibrate.add_argument("--name", help="also register the copy under this name, so --model NAME and the "
                           "widget's model list offer it")
    calibrate.add_argument("--percentile", type=float, default=None,
                           help="healthy-percentile threshold (default 99: about 1 %% of healthy brain flagged)")
    calibrate.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    calibrate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    models = commands.add_parser("models", help="list the bundled and downloadable models, or show checkpoints' cards")
    models.add_argument("paths", nargs="*", help="model names or checkpoint files (default: every registry model)")
    return parser


def _cohort_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bids-suffix", default="T1w", help="in a BIDS dataset, the images to read (default T1w)")
    parser.add_argument("--bids-filter", action="append", metavar="KEY=VALUE", default=[],
                        help="in a BIDS dataset, only images with this entity (e.g. acq=mprage); repeat for more")
    parser.add_argument("--derivatives", help="in a BIDS dataset, the folder holding the masks "
                        "(default: its derivatives/)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model name (see `brain-uad models`) or a checkpoint file "
                        "(default: for each scan, the registry's model for the contrast its name says, else the "
                        "bundled default model)")
    # Checked after parsing (main), not as argparse choices: the kinds contribute scorers, and
    # listing them loads every model kind, which --help should not wait for.
    parser.add_argument("--scorer", help="anomaly score: residual, ssim-ens, mhd-full, … (an unknown name lists them "
                        "all; default: the model's, else ssim-ens)")
    parser.add_argument("--lesion-direction", action="store_true",
                        help="count only deviations the model's contrast gives lesions (darker on T1, brighter on "
                        "T2/FLAIR): the one-way residual, with its own stored threshold")
    parser.add_argument("--samples", type=int, default=None, help="reconstructions with fresh noise (default 1; 10 for MHD)")
    parser.add_argument("--noise-levels", type=int, nargs="+", help="noise level(s) t; several are averaged")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0: same input, same map)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if getattr(arguments, "scorer", None) is not None and arguments.scorer not in SCORERS:
        parser.error(f"argument --scorer: invalid choice: {arguments.scorer!r} (choose from {', '.join(SCORERS)})")
    command = {"score": score_command, "evaluate": evaluate_command, "calibrate": calibrate_command,
               "models": models_command}
    try:
        return command[arguments.command](arguments)
    except OutputExists as error:
        print(f"brain-uad: error: {error} (use --overwrite to replace it)", file=sys.stderr)
        return 2
    except BrainUADError as error:  # bad scans, unavailable models, refused checkpoints, bad settings
        print(f"brain-uad: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: its traceback goes to the log, one plain line to the user
        print(f"brain-uad: {internal_error_message(error, f'brain-uad {arguments.command}')}", file=sys.stderr)
        return 1


# The single-scan options and the result kinds (``results``) they write.
_SINGLE_OUTPUTS = {"map": "anomaly_map", "recon": "reconstruction", "mask": "mask", "brain_mask": "brain_mask"}


def score_command(arguments) -> int:
    from .results import ScanResult, check_outputs, write_results

    outputs = {name: getattr(arguments, f"out_{name}") for name in _SINGLE_OUTPUTS}
    if arguments.out_dir:
        return _score_cohort(arguments, outputs)
    if len(arguments.inputs) > 1:
        raise SettingsError(f"{len(arguments.inputs)} inputs: score several scans with --out-dir DIR")
    arguments.input = arguments.inputs[0]
    if str(arguments.input).lower().endswith(".csv"):
        raise SettingsError(f"{arguments.input}: a list of scans is scored with --out-dir DIR")
    if not any(outputs.values()):
        raise SettingsError("nothing to write: give --out-map, --out-recon, --out-mask and/or --out-brain-mask "
                            "(or --out-dir DIR)")
    files = {_SINGLE_OUTPUTS[name]: Path(path) for name, path in outputs.items() if path}
    # Before minutes of analysis: two outputs one file, an output over the scan, a folder that
    # cannot be written (each used to fail only at the end, or replace the scan).
    check_outputs(files, inputs=[arguments.input, arguments.brain_mask], overwrite=arguments.overwrite)

    from .model_registry import scan_contrast

    contrast = scan_contrast(arguments.input, series_uid=arguments.series)
    model = _models_for(arguments, [contrast])[0]
    with _warnings_as_lines():
        model_path, metadata, settings = _model_and_settings(arguments, model)
        threshold = None
        if outputs["mask"]:
            threshold = resolve_threshold(arguments.threshold, metadata, settings)
            if threshold is None:
                raise SettingsError(f"--out-mask needs --threshold: the model stores none for scorer {settings.scorer}")
        scan, analysis = _analyse(arguments.input, arguments.brain_mask, model_path, metadata, settings,
                                  contrast=contrast, quiet=arguments.quiet, series_uid=arguments.series)
    write_results(analysis, files, threshold=threshold.value if threshold else None,
                  min_size_ml=arguments.min_size_ml, overwrite=arguments.overwrite)
    result = ScanResult.of(analysis, metadata, threshold, arguments.min_size_ml)
    if result.atypical:
        print(f"brain-uad: warning: {result.warning(arguments.input)}", file=sys.stderr)
    if not arguments.quiet:
        for line in result.lines():
            print(line, file=sys.stderr)
    return 0


def _score_cohort(arguments, outputs) -> int:
    """Many scans into --out-dir (``cohort`` does the work)."""
    from .cohort import Processes, print_line, progress_line, score_cohort
    from .cohort_records import FAILED, CohortJob
    from .downloads import file_sha256
    from .model_registry import scan_contrast

    given = [f"--out-{name.replace('_', '-')}" for name, value in outputs.items() if value]
    if given:
        raise SettingsError(f"--out-dir names every output itself; drop {', '.join(given)}")
    if arguments.series:
        raise SettingsError("--series picks one series of one scan; it does not go with --out-dir")
    if arguments.brain_mask:
        raise SettingsError("--brain-mask is for one scan; give a cohort's brain masks in a CSV's brain_mask column "
                            "or a BIDS derivatives folder")
    entries = _cohort_entries(arguments, arguments.inputs)
    processes = Processes.from_environment()
    # Without --model each scan gets its contrast's model: one job per model picked.
    contrasts = [None] * len(entries) if arguments.model else [scan_contrast(entry.scan, entry.id)
                                                                for entry in entries]
    models = _models_for(arguments, contrasts, say=processes.rank == 0)
    jobs = {}
    for model in dict.fromkeys(models):
        with _warnings_as_lines():
            model_path, metadata, settings = _model_and_settings(arguments, model)
            threshold = resolve_threshold(arguments.threshold, metadata, settings)
        jobs[model] = CohortJob(model_path=Path(model_path), model_sha256=file_sha256(Path(model_path)),
                                model_metadata=metadata, settings=settings, out_dir=Path(arguments.out_dir),
                                threshold=threshold, min_size_ml=arguments.min_size_ml,
                                overwrite=arguments.overwrite, model_name=model)
    if not arguments.quiet and processes.rank == 0:
        for model, job in jobs.items():
            print_line(f"{models.count(model)} scan(s), model {job.model_metadata['kind']} ({job.model_path.name}), "
                       f"scorer {job.settings.scorer}, "
                       + (f"threshold {job.threshold.describe()}" if job.threshold else "no threshold")
                       + (f", {processes.world_size} processes" if processes.distributed else "")
                       + (f", {arguments.workers} workers" if arguments.workers > 1 else ""))

    def report(index, count, row):
        if not arguments.quiet or row["status"] == FAILED:
            print_line("brain-uad: " + progress_line(index, count, row, processes))

    with _warnings_as_lines():
        summary = score_cohort(entries, [jobs[model] for model in models], workers=arguments.workers,
                               threads=arguments.threads, report=report)
    if processes.rank == 0 and not arguments.quiet:
        print_line(f"brain-uad: {summary.count('done')} done, {summary.count('skipped')} skipped, "
                   f"{summary.count('failed')} failed; summary in {summary.out_dir / 'summary.csv'}")
    if summary.total_failed:
        if processes.rank == 0:
            print(f"brain-uad: error: {summary.total_failed} of {len(entries)} scans failed "
                  f"(see {summary.out_dir / 'summary.csv'})", file=sys.stderr)
        return 2
    return 0


def _cohort_entries(arguments, sources):
    from .scan_list import read_scan_sources

    entities = {}
    for item in arguments.bids_filter:
        key, separator, value = item.partition("=")
        if not separator or not key or not value:
            raise SettingsError(f"--bids-filter {item!r}: write it as KEY=VALUE (e.g. acq=mprage)")
        entities[key] = value
    return read_scan_sources(sources, bids_suffix=arguments.bids_suffix, bids_entities=entities,
                             derivatives=arguments.derivatives)


# How a user of the command line overrides the model picked for a scan's contrast.
_PICK_HINT = "--model NAME|PATH picks another"


def _models_for(arguments, contrasts, *, say: bool = True) -> list[str]:
    """The model for each scan of the given contrasts: ``--model`` for all when given (the user's
    choice always wins), else the registry's model for each scan's contrast; a line on stderr for
    each contrast says which model and why (even with --quiet: it decides what the maps mean)."""
    from .model_registry import model_for_contrast

    if arguments.model:
        return [arguments.model] * len(contrasts)
    picks = [model_for_contrast(contrast) for contrast in contrasts]
    if say:
        for pick, count in Counter(picks).items():
            print(f"brain-uad: {pick.describe(_PICK_HINT, scans=count)}", file=sys.stderr)
    return [pick.name for pick in picks]


def _model_and_settings(arguments, model: str | None):
    """The checkpoint file of ``model`` (a name or path), its metadata, and the analysis
    settings (defaults from the model)."""
    from .analysis import AnalysisSettings
    from .checkpoint import read_metadata
    from .model_registry import resolve_model

    model_path = resolve_model(model, progressbar=not arguments.quiet)
    metadata = read_metadata(model_path)
    scorer = arguments.scorer
    if getattr(arguments, "lesion_direction", False):
        from .model_card import lesion_direction_scorer

        directed = lesion_direction_scorer(metadata)
        modality = (metadata.get("model_space") or {}).get("modality", "unknown")
        if directed is None:
            raise SettingsError(f"--lesion-direction: lesions have no single direction in the model's contrast "
                                f"({modality})")
        if scorer is not None and scorer != directed:
            raise SettingsError(f"--lesion-direction means --scorer {directed} for a {modality} model, not {scorer}")
        scorer = directed
    settings = AnalysisSettings.for_model(
        metadata, scorer=scorer, samples=arguments.samples, device=arguments.device, seed=arguments.seed,
        noise_levels=tuple(arguments.noise_levels) if arguments.noise_levels else None)
    return model_path, metadata, settings


def _analyse(image, brain_mask, model_path, metadata, settings, *, contrast: str | None, quiet: bool,
             series_uid: str | None = None):
    """Read one scan (a NIfTI file or a DICOM series) and its brain mask, warn if its
    ``contrast`` (guessed from its names) is another than the model's, and analyse it."""
    from .analysis import analyse_scan
    from .scan_reader import read_scan
    from .model_card import modality_mismatch
    from .models import load_model

    scan = read_scan(image, series_uid=series_uid)
    brain = read_scan(brain_mask, allow_empty=True) if brain_mask else None
    mismatch = modality_mismatch(metadata, contrast)
    if mismatch:
        warnings.warn(f"{image}: {mismatch}")
    analysis = analyse_scan(scan, load_model(model_path)[0], brain_mask=brain, settings=settings,
                            progress=None if quiet else _progress_bar())
    if not quiet:
        print(file=sys.stderr)
    return scan, analysis


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
    """Evaluate labelled scans. Without --model each scan gets its contrast's model; scans of
    different models are evaluated (and their means taken) model by model, one table each."""
    from .model_registry import scan_contrast

    if arguments.sources:
        if arguments.images or arguments.masks or arguments.brain_masks:
            raise SettingsError("give a list of scans (CSV or BIDS) or --images/--masks, not both")
        from .cohort import labelled_cases

        cases = labelled_cases(_cohort_entries(arguments, arguments.sources))
    else:
        cases = _cases_from_arguments(arguments)
    if arguments.json and Path(arguments.json).exists() and not arguments.overwrite:
        raise OutputExists(f"{arguments.json}: already exists; not overwriting it")

    contrasts = [scan_contrast(case.image, case.name or "") for case in cases]
    models = _models_for(arguments, contrasts)
    documents = []
    for model in dict.fromkeys(models):
        chosen = [index for index, name in enumerate(models) if name == model]
        documents.append(_evaluate_with(arguments, model, [cases[index] for index in chosen],
                                        [contrasts[index] for index in chosen]))
    if arguments.json:
        from .nifti import write_atomically

        document = documents[0] if len(documents) == 1 else {"models": documents}
        text = json.dumps(document, indent=2, default=float)
        write_atomically(arguments.json, lambda temporary: Path(temporary).write_text(text))
    return 0


def _evaluate_with(arguments, model: str, cases, contrasts) -> dict:
    """Evaluate ``cases`` with ``model``, print their table, and give the JSON document."""
    from .evaluation import evaluate_cases
    from .model_card import modality_mismatch
    from .models import load_model

    def announce(index, count, case):
        mismatch = modality_mismatch(metadata, contrasts[index])
        if mismatch:
            warnings.warn(f"{case.image}: {mismatch}")
        if not arguments.quiet:
            if index:
                print(file=sys.stderr)
            print(f"case {index + 1}/{count}: {case.image}", file=sys.stderr)

    with _warnings_as_lines():
        model_path, metadata, settings = _model_and_settings(arguments, model)
        threshold = resolve_threshold(arguments.threshold, metadata, settings)
        cohort = evaluate_cases(cases, load_model(model_path)[0], settings, threshold=threshold, announce=announce,
                                progress=None if arguments.quiet else _progress_bar())
    if not arguments.quiet:
        print(file=sys.stderr)

    rows, mean, pooled = cohort.rows, cohort.mean, cohort.pooled
    columns = ["case", "lesion_voxels", "best_dice", *(["dice"] if threshold else []), "auprc", "l1_ratio"]
    print(f"model {metadata['kind']} ({model_path.name}), scorer {settings.scorer}, N = {settings.samples}"
          + (f", threshold {threshold.describe()}" if threshold is not None else ", no threshold"))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in [*rows, mean]:
        print("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    print(f"| pooled | | {pooled['best_dice']:.4f} |" + (" |" if threshold else "") + f" {pooled['auprc']:.4f} | |")
    return cohort.document(model=str(model_path), kind=metadata["kind"])


def _cases_from_arguments(arguments):
    """Cases from --images, --masks and --brain-masks, given in the same order."""
    from .evaluation import LabelledCase

    images, masks = arguments.images, arguments.masks
    brains = arguments.brain_masks
    if not images or not masks:
        raise SettingsError("give the scans to evaluate: a CSV list or BIDS dataset, or --images with --masks")
    if len(masks) != len(images):
        raise SettingsError(f"{len(images)} --images but {len(masks)} --masks: give one lesion mask per image")
    if brains is not None and len(brains) != len(images):
        raise SettingsError(f"{len(images)} --images but {len(brains)} --brain-masks: give one per image, or none")
    return [LabelledCase(image, mask, brains[index] if brains else None, name=Path(image).name)
            for index, (image, mask) in enumerate(zip(images, masks))]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def calibrate_command(arguments) -> int:
    """A copy of the model calibrated on the user's healthy scans (``calibration``)."""
    from .calibration import calibrate_for_scanner
    from .evaluation import LabelledCase
    from .model_registry import check_user_model_name, register_user_model, scan_contrast
    from .thresholds import HEALTHY_PERCENTILE, healthy_threshold_name

    entries = _cohort_entries(arguments, arguments.healthy)
    healthy = [LabelledCase(entry.scan, None, entry.brain_mask, name=entry.id) for entry in entries]
    # Without --model the scans' contrast picks the model, as for scoring; scans of several
    # contrasts cannot calibrate one model.
    models = _models_for(arguments, [scan_contrast(entry.scan, entry.id) for entry in entries])
    if len(set(models)) > 1:
        raise SettingsError(f"these healthy scans are of several contrasts and pick {', '.join(sorted(set(models)))}; "
                            "calibrate one contrast at a time, or name the model with --model")
    model_name = models[0]
    output = Path(arguments.output) if arguments.output else default_calibrated_path(arguments.healthy[0], model_name)
    if output.exists() and not arguments.overwrite:
        raise OutputExists(f"{output}: already exists; not overwriting it")
    if arguments.name:  # before the work, not after it
        check_user_model_name(arguments.name, output, replace=arguments.overwrite)
    percentile = HEALTHY_PERCENTILE if arguments.percentile is None else arguments.percentile
    say = (lambda text: None) if arguments.quiet else (lambda text: print(f"brain-uad: {text}", file=sys.stderr))
    with _warnings_as_lines():
        card = calibrate_for_scanner(model_name, healthy, output, percentile=percentile,
                                     device=arguments.device, overwrite=arguments.overwrite, say=say)
    if arguments.name:
        register_user_model(arguments.name, output, replace=arguments.overwrite)
    threshold = card["thresholds"][healthy_threshold_name(percentile)]["value"]
    print(f"brain-uad: wrote {output}: {healthy_threshold_name(percentile)} = {threshold:.4g} on {len(healthy)} "
          f"healthy scans" + (f"; use it as --model {arguments.name}" if arguments.name else
                              f"; use it as --model {output}"), file=sys.stderr)
    return 0


def default_calibrated_path(first_source: str, model_name: str) -> Path:
    """Beside the user's data: in the folder of scans given, else beside the file or list."""
    source = Path(first_source)
    folder = source if source.is_dir() else source.parent
    return folder / f"{Path(model_name).name.removesuffix('.safetensors')}-calibrated.safetensors"


def models_command(arguments) -> int:
    from .model_card import card
    from .model_registry import registry_cards, resolve_model

    if not arguments.paths:
        print(json.dumps(registry_cards(), indent=2))
        return 0
    for name_or_path in arguments.paths:
        print(json.dumps(card(resolve_model(name_or_path)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
