"""One scan through the whole data flow: the single function the widget and the CLI both call.

``analyse_scan`` runs steps 2 to 6 in order: the scan to model space (``preprocess``),
pseudo-healthy reconstructions (``reconstruct``), the anomaly score (``scoring``), median
filter and brain erosion (``postprocess.prepare``), and everything back onto the scan's own
grid. What comes back (:class:`ScanAnalysis`) holds the results on the native grid and the
filtered map there, so a new threshold only thresholds and labels (a slider never re-runs the
network) and every mask is already on the original voxels for export.

The same scan, model and settings give the same maps whichever door asks (seeded noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .brain_mask import GIVEN, BrainMask, find_brain
from .errors import SettingsError
from .nifti import NiftiVolume, ScanError
from .model_card import FALLBACK_SCORER, default_scorer
from .models import ReconstructionModel
from .postprocess import MIN_COMPONENT_VOXELS, FilteredMap, prepare
from .preprocess import ModelSpaceVolume, to_model_space
from .reconstruct import Cancelled, pick_device, reconstruct_volume_with_maps
from .scoring import SCORERS, ensemble_mean, score

# Share of the progress bar each stage takes (reconstruction dominates).
_STAGES = {"brain": 0.10, "model space": 0.05, "reconstruction": 0.70, "scoring": 0.08, "post-processing": 0.04, "native grid": 0.03}


# The thesis's test-time ensemble of noise levels: reconstructions at t = 250, 500 and 750
# (of T = 1000) averaged, the alternative to one fixed t_test = 500.
NOISE_LEVEL_ENSEMBLE = (250, 500, 750)


@dataclass(frozen=True)
class AnalysisSettings:
    """How to analyse a scan. ``noise_levels`` None means the model's ``t_test``; several levels
    average their reconstructions (the thesis's 250/500/750 ensemble)."""

    scorer: str = FALLBACK_SCORER
    samples: int = 1
    # None: the model's own test-time noise level (diffusion kinds); else averaged over these
    # (NOISE_LEVEL_ENSEMBLE, the thesis's ensemble, is what the widget offers).
    noise_levels: tuple[int, ...] | None = None
    scorer_parameters: dict = field(default_factory=dict)
    # The 5³ median filter of post-processing; None: the scorer's paper's rule (on for all but
    # PHANES's map, ``scoring.Scorer.median_filtered``).
    median: bool | None = None
    batch_size: int | None = None
    device: str = "auto"
    seed: int | None = 0

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise SettingsError(f"unknown scorer {self.scorer!r}; known: {', '.join(SCORERS)}")
        if self.samples < 1:
            raise SettingsError(f"samples must be at least 1, not {self.samples}")
        if SCORERS[self.scorer].needs_samples and self.samples < 2:
            raise SettingsError(
                f"the {self.scorer} scorer compares the scan with several reconstructions; "
                "ask for at least 2 samples (the thesis uses 10)"
            )
        unknown = sorted(set(self.scorer_parameters) - set(SCORERS[self.scorer].params))
        if unknown:
            raise SettingsError(f"the {self.scorer} scorer does not take {', '.join(unknown)}")
        if self.median is None:
            object.__setattr__(self, "median", SCORERS[self.scorer].median_filtered)

    @classmethod
    def for_model(cls, metadata: dict, *, scorer: str | None = None, samples: int | None = None,
                  **settings) -> "AnalysisSettings":
        """Settings for a model: what the user chose, and for the rest the model's defaults —
        the scorer it was calibrated with, and the number of reconstructions that scorer needs.
        Every door (widget, CLI, cohort, calibration, worklist) builds its settings here."""
        scorer = scorer or default_scorer(metadata)
        return cls(scorer=scorer, samples=samples or cls.samples_for(scorer), **settings)

    @staticmethod
    def samples_for(scorer: str) -> int:
        """The number of reconstructions ``scorer`` needs by default (10 for the Mahalanobis ones)."""
        if scorer not in SCORERS:
            raise SettingsError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
        return SCORERS[scorer].default_samples


@dataclass(eq=False)
class ScanAnalysis:
    """A scan's analysis: model-space intermediates and native-grid results."""

    scan: NiftiVolume
    settings: AnalysisSettings
    model_space: ModelSpaceVolume = field(repr=False)
    score_model_space: np.ndarray = field(repr=False)  # (X, Y, Z)
    # The mean of the N reconstructions and their standard deviation (None for N = 1), model
    # space, in [0, 1]: with the score, all a saved analysis needs to come back without the network.
    reconstruction_model_space: np.ndarray = field(repr=False)
    spread_model_space: np.ndarray | None = field(repr=False)
    brain_mask: np.ndarray = field(repr=False)  # bool, native grid: where scores are computed
    reconstruction: np.ndarray = field(repr=False)  # native grid, scan intensities
    anomaly_map: np.ndarray = field(repr=False)  # native grid, 0 outside the brain
    spread: np.ndarray | None = field(repr=False)  # native grid, std over samples (N > 1)
    filtered: FilteredMap = field(repr=False)  # native grid, median-filtered and eroded
    model_voxel_ml: float = 0.008
    brain: BrainMask | None = field(default=None, repr=False)  # the mask found for the scan, and its source
    # The kind's extra maps (``ReconstructionModel.extra_maps``: SADM's segmentation, PHANES's
    # mask), mean over the N samples, in model space and on the native grid (0 outside the brain).
    model_maps_model_space: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    model_maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def default_min_size_ml(self) -> float:
        """The papers' minimum lesion size, 7 model-space voxels, in mL (0.056 at 2 mm)."""
        return MIN_COMPONENT_VOXELS * self.model_voxel_ml

    def mask_at(self, threshold: float, min_size_ml: float | None = None) -> np.ndarray:
        """Binary mask (uint8, native grid): filtered score > threshold, small components removed."""
        size = self.default_min_size_ml if min_size_ml is None else min_size_ml
        return self.filtered.mask_at(threshold, min_size_ml=size).view(np.uint8)  # 0/1 as they are: no copy

    def labels_at(self, threshold: float, min_size_ml: float | None = None) -> np.ndarray:
        size = self.default_min_size_ml if min_size_ml is None else min_size_ml
        return self.filtered.labels_at(threshold, min_size_ml=size)

    def with_median(self, median: bool) -> "ScanAnalysis":
        """The same analysis with the median filter switched on or off: post-processing only,
        from the cached model-space map; the network does not run again."""
        if median == self.filtered.median:
            return self
        settings = replace(self.settings, median=median)
        filtered = filtered_on_native_grid(self.scan, self.model_space, self.score_model_space, self.brain_mask,
                                           settings, self.model_maps_model_space)
        return replace(self, filtered=filtered, settings=settings)

    def findings(self, threshold: float, min_size_ml: float | None = None) -> list[dict]:
        """One row per finding, largest first: voxels, mL, mean/max score, centre (native voxel)."""
        size = self.default_min_size_ml if min_size_ml is None else min_size_ml
        return self.filtered.findings(threshold, min_size_ml=size)


def analyse_scan(
    scan: NiftiVolume,
    model: ReconstructionModel,
    *,
    brain_mask: NiftiVolume | np.ndarray | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ScanAnalysis:
    """Analyse one scan with one model (steps 2-6 of the data flow).

    ``brain_mask`` on the scan's grid; without it the brain is the scan's non-background voxels
    when it is skull-stripped, else it is extracted (``brain_mask.find_brain``; the result is
    ``ScanAnalysis.brain``). ``progress(fraction, stage)`` reports from 0 to 1; ``cancelled()``
    is polled between batches and stages and raises :class:`Cancelled`.
    """
    if SCORERS[settings.scorer].needs_samples and not model.samples_differ:
        raise SettingsError(
            f"scorer {settings.scorer} compares N different reconstructions, but a {model.kind} model "
            "reconstructs the same way every time; pick a scorer that needs one reconstruction "
            "(residual, ssim, ssim-ens) or a diffusion model"
        )
    missing_maps = [name for name in SCORERS[settings.scorer].needs_maps if name not in model.extra_maps]
    if missing_maps:
        raise SettingsError(
            f"scorer {settings.scorer} needs the model's {', '.join(missing_maps)} map, which a {model.kind} model "
            "does not make; pick another scorer"
        )
    report = _Progress(progress)

    def check_cancel():
        if cancelled is not None and cancelled():
            raise Cancelled("analysis cancelled")

    report.start("brain")
    extraction_device = "cuda" if pick_device(settings.device).type == "cuda" else "cpu"
    brain = find_brain(scan, brain_mask, device=extraction_device, progress=report.within, cancelled=cancelled)
    check_cancel()

    report.start("model space")
    volume = to_model_space(scan, brain_mask=brain.mask, spec=model.spec)
    check_cancel()

    analysis = analyses_in_model_space(scan, volume, brain, model, {settings.scorer: settings}, report=report,
                                       cancelled=cancelled)[settings.scorer]
    report.start("done")
    return analysis


def analyses_in_model_space(
    scan: NiftiVolume,
    volume: ModelSpaceVolume,
    brain: BrainMask,
    model: ReconstructionModel,
    settings_by_scorer: dict[str, AnalysisSettings],
    *,
    report: "_Progress | None" = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, ScanAnalysis]:
    """Steps 3 to 6 for a scan already in model space, for one or several scorers: the network
    runs once per group of scorers asking for the same reconstructions (N, noise levels, seed),
    and each scorer's map is post-processed and brought back on its own. ``analyse_scan`` runs it
    for one scorer; a benchmark comparing scorers on one brain runs it for several."""
    report = report or _Progress(None)

    def check_cancel():
        if cancelled is not None and cancelled():
            raise Cancelled("analysis cancelled")

    groups: dict[tuple, list[str]] = {}
    for scorer, settings in settings_by_scorer.items():
        key = (settings.samples, settings.noise_levels, settings.seed, settings.batch_size, settings.device)
        groups.setdefault(key, []).append(scorer)
    analyses = {}
    for scorers in groups.values():
        settings = settings_by_scorer[scorers[0]]
        report.start("reconstruction")
        reconstructions, sample_maps = reconstruct_volume_with_maps(
            model,
            volume.image,
            samples=settings.samples,
            t=list(settings.noise_levels) if settings.noise_levels else None,
            batch_size=settings.batch_size,
            device=settings.device,
            seed=settings.seed,
            progress=lambda done, total: report.within(done / total),
            cancelled=cancelled,
        )
        check_cancel()
        mean_reconstruction = ensemble_mean(list(reconstructions)) if len(reconstructions) > 1 else reconstructions[0]
        spread = reconstructions.std(axis=0).astype(np.float32) if len(reconstructions) > 1 else None
        model_maps = {name: values.mean(axis=0).astype(np.float32) for name, values in sample_maps.items()}
        for scorer in scorers:
            settings = settings_by_scorer[scorer]
            report.start("scoring")
            other = reconstructions if SCORERS[scorer].needs_samples else mean_reconstruction
            score_map = np.asarray(score(scorer, volume.image, other, volume.brain_mask, maps=model_maps,
                                         **settings.scorer_parameters), dtype=np.float32)
            score_map = np.where(volume.brain_mask, score_map, np.float32(0))
            check_cancel()
            analyses[scorer] = analysis_from_model_space(
                scan, volume, brain, settings, score_map=score_map,
                mean_reconstruction=np.asarray(mean_reconstruction), spread=spread,
                model_voxel_ml=float(model.spec.spacing_mm) ** 3 / 1000.0, model_maps=model_maps,
                report=report, check_cancel=check_cancel)
    return analyses


def analysis_from_model_space(
    scan: NiftiVolume,
    volume: ModelSpaceVolume,
    brain: BrainMask,
    settings: AnalysisSettings,
    *,
    score_map: np.ndarray,
    mean_reconstruction: np.ndarray,
    spread: np.ndarray | None,
    model_voxel_ml: float,
    model_maps: dict[str, np.ndarray] | None = None,
    report: "_Progress | None" = None,
    check_cancel: Callable[[], None] | None = None,
) -> ScanAnalysis:
    """Steps 5 and 6 from the model-space score map and reconstructions: post-processing, and
    everything back on the scan's grid. A fresh run and a saved one (``analysis_cache``) both
    end here, so a restored analysis is the one that was saved, voxel for voxel."""
    report = report or _Progress(None)
    report.start("post-processing")
    transform = volume.transform
    if brain.source == GIVEN:
        native_brain = brain.mask
    else:
        # The model-space mask brought back, cut to the found mask voxel for voxel (the 2 mm
        # mask alone would spill over the brain's edge on a finer grid).
        native_brain = (transform.to_native(volume.brain_mask.astype(np.float32)) >= 0.5) & brain.mask
    model_maps = dict(model_maps or {})
    filtered = filtered_on_native_grid(scan, volume, score_map, native_brain, settings, model_maps)
    if check_cancel is not None:
        check_cancel()

    report.start("native grid")
    recon_native = transform.to_native(volume.to_scan_intensities(mean_reconstruction))
    reconstruction = np.where(native_brain, recon_native, scan.data).astype(np.float32)
    anomaly_map = np.where(native_brain, transform.to_native(score_map), np.float32(0)).astype(np.float32)
    spread_native = None
    if spread is not None:
        # Spread in scan intensities, so it reads in the same units as the reconstruction.
        spread_scan_units = volume.to_scan_intensities(spread, difference=True)
        spread_native = np.where(native_brain, transform.to_native(spread_scan_units), np.float32(0)).astype(np.float32)
    native_maps = {name: np.where(native_brain, transform.to_native(values), np.float32(0)).astype(np.float32)
                   for name, values in model_maps.items()}
    return ScanAnalysis(
        scan=scan,
        settings=settings,
        model_space=volume,
        score_model_space=score_map,
        reconstruction_model_space=mean_reconstruction,
        spread_model_space=spread,
        brain_mask=native_brain,
        reconstruction=reconstruction,
        anomaly_map=anomaly_map,
        spread=spread_native,
        filtered=filtered,
        model_voxel_ml=model_voxel_ml,
        brain=brain,
        model_maps_model_space=model_maps,
        model_maps=native_maps,
    )


def filtered_on_native_grid(
    scan: NiftiVolume, volume: ModelSpaceVolume, score_map: np.ndarray, native_brain: np.ndarray,
    settings: AnalysisSettings, model_maps: dict[str, np.ndarray] | None = None,
) -> FilteredMap:
    """Post-process the model-space map as the scorer's paper does (``scoring.Scorer``: median
    5³ unless switched off, eroded brain, a kind's term added after the median), then carry it to
    the scan's grid: thresholds apply there, to the voxels the user exports."""
    transform = volume.transform
    scorer = SCORERS[settings.scorer]
    filtered_model = prepare(
        score_map, volume.brain_mask, median=settings.median, spacing_mm=(transform.spacing_mm,) * 3,
        iterations=None if scorer.brain_eroded else 0,
        added_after_median=scorer.part_after_median(model_maps, volume.brain_mask, **settings.scorer_parameters),
    )
    region = (transform.to_native(filtered_model.region.astype(np.float32)) >= 0.5) & native_brain
    if not region.any():
        raise ScanError(f"{scan.path}: the eroded brain region vanishes on the scan's grid; is the brain mask right?")
    return FilteredMap(
        np.where(region, transform.to_native(filtered_model.values), np.float32(0)).astype(np.float32),
        region, native_brain, tuple(float(s) for s in scan.geometry.spacing), filtered_model.median,
        filtered_model.iterations,
    )


class _Progress:
    """Turns stage starts and within-stage fractions into one fraction from 0 to 1."""

    def __init__(self, callback):
        self.callback = callback
        self.offset, self.share, self.stage = 0.0, 0.0, ""

    def start(self, stage: str) -> None:
        self.offset += self.share
        self.share = _STAGES.get(stage, 0.0)
        self.stage = stage
        if self.callback is not None:
            self.callback(min(self.offset, 1.0) if stage != "done" else 1.0, stage)

    def within(self, fraction: float) -> None:
        if self.callback is not None:
            self.callback(min(self.offset + self.share * fraction, 1.0), self.stage)
