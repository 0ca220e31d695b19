"""The registry of scorers: every anomaly score by name, with what it needs and how it is
post-processed, so the widget, the command line and the evaluation need not hard-code them;
:func:`score` calls any of them by name with one convention.

The scores of this package register here when it is imported. A model kind whose paper brings
its own score (SADM, PHANES) defines it in its own module and registers it with
:func:`register_scorer` when that module is imported: the kind owns its score.

**Why reading the registry imports the model kinds.** The kinds' modules import this package
(they use its scores and filters), so this package must not import them at module level: that
would be an import cycle (scoring → models → models.sadm → scoring, half-initialised). Yet
``import napari_brain_uad.scoring`` alone has to list every scorer, the kinds' ones included.
So :data:`SCORERS` is a read-only view that, on its first read, imports ``napari_brain_uad.models``
(which imports every kind, each registering its scorers) inside a function: by then this
package has finished initialising, so the only dependency at import time runs one way, from
the kinds to scoring. Registering never reads the view, so a kind's module can register while
it is being imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .arrays import ArrayLike
from .mahalanobis import mahalanobis, mhd_ssim, s_mean
from .residual import residual
from .ssim import SSIM_ENS_SIGMAS, ssim_ens, ssim_map

__all__ = [
    "LESION_DIRECTION_OF_MODALITY",
    "MHD_PARAMS",
    "SAMPLES_FOR_DISTRIBUTION",
    "SCORERS",
    "SSIM_PARAMS",
    "Scorer",
    "lesion_direction_scorer",
    "register_scorer",
    "score",
    "scorer_names",
]

# N reconstructions with fresh noise for the scorers that compare the scan with their spread
# (the thesis uses 10 for MHD).
SAMPLES_FOR_DISTRIBUTION = 10

MHD_PARAMS = {"reg": 1e-2, "smooth_sigma": 1.0}
"""The Mahalanobis scorers' parameters and their defaults."""

SSIM_PARAMS = {"sigma": 1.0, "data_range": None}
"""The parameters, with their defaults, of every scorer built on one SSIM map (kinds' too)."""


@dataclass(frozen=True)
class Scorer:
    """One anomaly score: ``fn(image, other, mask=None, **params)``, higher = more anomalous.

    ``needs`` says what ``other`` is: ``"reconstruction"`` (one image of the image's shape) or
    ``"samples"`` (N ≥ 2 reconstructions stacked along a new first axis). ``params`` names the
    keyword arguments ``fn`` accepts, with their defaults. ``needs_maps`` names the maps a model
    kind computes beside its reconstruction (``ReconstructionModel.extra_maps``) that ``fn``
    takes as ``maps={name: array}``; only kinds that make them can use the scorer.

    How the score is post-processed (``postprocess.prepare``) is the paper's rule for it, so it
    is declared here: ``median_filtered`` (the 5³ median, the default of ``AnalysisSettings``),
    ``brain_eroded`` (the brain's rim cut away) and ``after_median`` — ``after_median(maps,
    **params)`` gives the part of the score that is added after the median, untouched by it
    (SADM's segmentation term), or None.
    """

    name: str
    fn: Callable[..., ArrayLike]
    needs: Literal["reconstruction", "samples"]
    description: str
    params: Mapping[str, object] = field(default_factory=dict)
    needs_maps: tuple[str, ...] = ()
    median_filtered: bool = True
    brain_eroded: bool = True
    after_median: Callable[..., np.ndarray] | None = None

    @property
    def needs_samples(self) -> bool:
        return self.needs == "samples"

    @property
    def default_samples(self) -> int:
        """Reconstructions to make when the user does not say: the thesis's N for scorers that
        compare several, else one."""
        return SAMPLES_FOR_DISTRIBUTION if self.needs_samples else 1

    def part_after_median(self, maps: Mapping[str, ArrayLike] | None, mask=None, **params) -> np.ndarray | None:
        """The part of this scorer's map that post-processing adds after the median filter
        (0 outside ``mask``), or None when the median sees the whole map."""
        if self.after_median is None:
            return None
        part = np.asarray(self.after_median(maps or {}, **{**self.params, **params}), dtype=np.float32)
        return part if mask is None else np.where(np.asarray(mask, dtype=bool), part, np.float32(0))

    def usable_with(self, maps: Sequence[str]) -> bool:
        """Whether a model that makes the maps ``maps`` can feed this scorer."""
        return set(self.needs_maps) <= set(maps)

    def __call__(self, image: ArrayLike, other: ArrayLike, mask: ArrayLike | None = None,
                 maps: Mapping[str, ArrayLike] | None = None, **params) -> ArrayLike:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"scorer {self.name!r} does not take {', '.join(unknown)}; "
                f"it takes {', '.join(self.params) or 'no parameters'}"
            )
        if not self.needs_maps:
            return self.fn(image, other, mask=mask, **params)
        missing = [name for name in self.needs_maps if name not in (maps or {})]
        if missing:
            raise ValueError(f"scorer {self.name!r} needs the model's {', '.join(missing)} map(s)")
        return self.fn(image, other, mask=mask, maps={name: maps[name] for name in self.needs_maps}, **params)


def _ssim_score(image, reconstruction, mask=None, sigma=1.0, data_range=None):
    return 1 - ssim_map(image, reconstruction, sigma=sigma, data_range=data_range, mask=mask)


def _mhd_scorer(covariance: str) -> Callable[..., ArrayLike]:
    def fn(image, samples, mask=None, reg=1e-2, smooth_sigma=1.0):
        return mahalanobis(image, samples, mask=mask, covariance=covariance, reg=reg, smooth_sigma=smooth_sigma)

    return fn


def _mhd_ssim_scorer(covariance: str) -> Callable[..., ArrayLike]:
    def fn(image, samples, mask=None, reg=1e-2, smooth_sigma=1.0, sigma=1.0, data_range=None):
        return mhd_ssim(
            image, samples, mask=mask, covariance=covariance, reg=reg, smooth_sigma=smooth_sigma,
            sigma=sigma, data_range=data_range,
        )

    return fn



def _directed_residual(direction: str) -> Callable[..., ArrayLike]:
    def fn(image, reconstruction, mask=None):
        return residual(image, reconstruction, mask=mask, direction=direction)

    return fn


class _Registry(Mapping):
    """Every registered scorer by name, in the order registered (read-only: add one with
    :func:`register_scorer`). The first read imports the model kinds, whose modules register
    their own scorers (see the module docstring)."""

    def __init__(self, scorers: dict[str, Scorer]) -> None:
        self._scorers = scorers

    def __getitem__(self, name: str) -> Scorer:
        _load_kind_scorers()
        return self._scorers[name]

    def __iter__(self) -> Iterator[str]:
        _load_kind_scorers()
        return iter(self._scorers)

    def __len__(self) -> int:
        _load_kind_scorers()
        return len(self._scorers)

    def __repr__(self) -> str:
        return f"SCORERS({', '.join(self)})"


_registered: dict[str, Scorer] = {}
SCORERS: Mapping[str, Scorer] = _Registry(_registered)
"""Every scorer by name, in a fixed order: this package's, then the model kinds' (read-only)."""

_kinds_lock = threading.RLock()
_kinds_loaded = False


def _load_kind_scorers() -> None:
    """Import the model kinds once, so that the scorers they register are listed."""
    global _kinds_loaded
    if _kinds_loaded:
        return
    with _kinds_lock:  # re-entrant: a read while the kinds are being imported returns at once
        if _kinds_loaded:
            return
        _kinds_loaded = True
        try:
            from .. import models  # noqa: F401  (a function-level import: see the module docstring)
        except BaseException:
            _kinds_loaded = False
            raise


def register_scorer(scorer: Scorer) -> Scorer:
    """Add ``scorer`` to :data:`SCORERS` under its name (a model kind calls this when its module
    is imported). A name is registered once; the same function registered again (its module
    re-imported) replaces the first."""
    # _registered, not SCORERS: reading SCORERS would import the kinds, which may be importing now.
    previous = _registered.get(scorer.name)
    if previous is not None and (previous.fn.__module__, previous.fn.__qualname__) != (
            scorer.fn.__module__, scorer.fn.__qualname__):
        raise ValueError(f"a scorer named {scorer.name!r} is already registered ({previous.description})")
    _registered[scorer.name] = scorer
    return scorer


for _scorer in (
    Scorer("residual", residual, "reconstruction", "|x − x̂|: absolute reconstruction error"),
    Scorer("residual-dark", _directed_residual("darker"), "reconstruction",
           "x̂ − x where the scan is darker than its reconstruction, else 0 (lesions dark on T1)"),
    Scorer("residual-bright", _directed_residual("brighter"), "reconstruction",
           "x − x̂ where the scan is brighter than its reconstruction, else 0 (lesions bright on T2/FLAIR)"),
    Scorer("ssim", _ssim_score, "reconstruction", "1 − SSIM(x, x̂), Gaussian window σ", SSIM_PARAMS),
    Scorer(
        "ssim-ens", ssim_ens, "reconstruction",
        "1 − softmax(−SSIM)-weighted SSIM over window spreads σ = 0.3 … 1.7",
        {"sigmas": SSIM_ENS_SIGMAS, "data_range": None},
    ),
    Scorer(
        "mhd-diag", _mhd_scorer("diag"), "samples",
        "Mahalanobis distance to N reconstructions, per-pixel variances only", MHD_PARAMS,
    ),
    Scorer(
        "mhd-full", _mhd_scorer("full"), "samples",
        "Mahalanobis distance to N reconstructions, full covariance per slice", MHD_PARAMS,
    ),
    Scorer(
        "mhd-full-ssim", _mhd_ssim_scorer("full"), "samples",
        "normalised full-covariance MHD × (1 − SSIM(x, mean of the samples))",
        {**MHD_PARAMS, **SSIM_PARAMS},
    ),
    Scorer(
        "mhd-diag-ssim", _mhd_ssim_scorer("diag"), "samples",
        "normalised diagonal MHD × (1 − SSIM(x, mean of the samples))",
        {**MHD_PARAMS, **SSIM_PARAMS},
    ),
    Scorer("s-mean", s_mean, "samples", "1 − SSIM(x, mean of the N samples)", SSIM_PARAMS),
):
    register_scorer(_scorer)
del _scorer


# Which way lesions go in each contrast (most MS lesions: dark on T1, bright on T2 and FLAIR),
# and the one-way residual that counts only that way. Contrasts not listed (T1c: enhancing
# lesions are bright, necrosis dark) have none: both ways count.
LESION_DIRECTION_OF_MODALITY = {"T1": "darker", "T2": "brighter", "FLAIR": "brighter"}
_DIRECTED_RESIDUAL = {"darker": "residual-dark", "brighter": "residual-bright"}


def lesion_direction_scorer(modality: str | None) -> str | None:
    """The residual that counts only the lesion direction of ``modality`` (a model's contrast),
    or None when the contrast has no single lesion direction."""
    direction = LESION_DIRECTION_OF_MODALITY.get(str(modality or "").upper())
    return _DIRECTED_RESIDUAL.get(direction) if direction else None


def scorer_names(needs: str | None = None, maps: Sequence[str] | None = None) -> list[str]:
    """Names in :data:`SCORERS`, optionally only those needing ``"reconstruction"`` or ``"samples"``,
    and only those a model making the extra maps ``maps`` can feed (None: no filter)."""
    return [name for name, scorer in SCORERS.items()
            if (needs is None or scorer.needs == needs) and (maps is None or scorer.usable_with(maps))]


def score(
    name: str,
    image: ArrayLike,
    reconstruction_or_samples: ArrayLike,
    mask: ArrayLike | None = None,
    maps: Mapping[str, ArrayLike] | None = None,
    **params,
) -> ArrayLike:
    """Compute the scorer ``name`` of :data:`SCORERS`: one call convention for all of them
    (``maps``: the model's extra maps, for the scorers that need them)."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}") from None
    return scorer(image, reconstruction_or_samples, mask=mask, maps=maps, **params)
