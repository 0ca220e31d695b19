"""One scan's session: its analysis, and the threshold and minimum lesion size the user is at.

The main widget shows a :class:`ScanSession` (slider, preset, mask, findings) and the Evaluate
widget reads it, so both apply the same rules, owned here rather than in Qt code:

- where the threshold starts: the model's healthy-percentile threshold for the analysis's
  scorer when the map's scores reach it, else the middle of the map's range;
- the threshold's range (the filtered map's scores) and the presets that apply (the thresholds
  stored with the model for the analysis's scorer), a preset outside the range being clamped
  into it with a message;
- the proposed mask and the findings at the current threshold and minimum size, from the
  cached filtered map: the network never runs again;
- the median switch, which redoes the post-processing only and keeps the user's choices;
- evaluation against a lesion mask with exactly the numbers ``brain-uad evaluate`` gives.

Everything here is on the scan's own (source) grid; turning it into layers is the widget's job.
No Qt or napari import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .analysis import ScanAnalysis
from .evaluation import CaseEvaluation, evaluate_analysis
from .thresholds import StoredThreshold, default_threshold, stored_thresholds

# The width given to a map whose scores are all equal, so a slider over it still has a range.
_FLAT_MAP_WIDTH = 1e-6


@dataclass(eq=False)
class ScanSession:
    """A scan's analysis with the user's current choices on it.

    ``preset`` names the stored threshold the current one came from; it is None once the user
    sets a threshold of their own."""

    analysis: ScanAnalysis
    model_metadata: Mapping[str, Any]
    threshold: float
    min_size_ml: float
    preset: str | None = None

    @classmethod
    def start(cls, analysis: ScanAnalysis, model_metadata: Mapping[str, Any], *,
              min_size_ml: float | None = None) -> "ScanSession":
        """A session on a new analysis, at the model's healthy-percentile threshold for the
        analysis's scorer when the map's scores reach it, else at the middle of their range.
        ``min_size_ml`` None: the papers' minimum lesion size for the model's voxels."""
        size = analysis.default_min_size_ml if min_size_ml is None else float(min_size_ml)
        low, high = _score_range(analysis)
        healthy = default_threshold(model_metadata, analysis.settings.scorer)
        if healthy is not None and low <= healthy.value <= high:
            return cls(analysis, model_metadata, healthy.value, size, preset=healthy.name)
        return cls(analysis, model_metadata, low + 0.5 * (high - low), size)

    @property
    def scorer(self) -> str:
        return self.analysis.settings.scorer

    @property
    def threshold_range(self) -> tuple[float, float]:
        """The lowest and highest filtered score: every threshold that changes the mask."""
        return _score_range(self.analysis)

    @property
    def presets(self) -> dict[str, StoredThreshold]:
        """The thresholds stored with the model for the analysis's scorer, by name."""
        return stored_thresholds(self.model_metadata, self.scorer)

    def set_threshold(self, value: float) -> None:
        """The user's own threshold: it no longer comes from a preset."""
        self.threshold, self.preset = float(value), None

    def apply_preset(self, name: str) -> str | None:
        """Move to the stored threshold ``name``, clamped into the map's range. Returns a
        message for the user when it had to be clamped or does not apply to this analysis
        (then nothing changes), else None."""
        preset = self.presets.get(name)
        if preset is None:
            return f"{name} was not calibrated for this result's model and scorer ({self.scorer})"
        low, high = self.threshold_range
        self.threshold, self.preset = min(max(preset.value, low), high), name
        if not low <= preset.value <= high:
            return f"{name} = {preset.value:.4g} lies outside this map's scores ({low:.4g} to {high:.4g})"
        return None

    def proposed_mask(self) -> np.ndarray:
        """The mask the analysis proposes at the current threshold and minimum size (uint8, the
        scan's grid): filtered score above the threshold, small components removed."""
        return self.analysis.mask_at(self.threshold, self.min_size_ml)

    def findings(self) -> list[dict]:
        """The proposed mask's components, largest first (see ``ScanAnalysis.findings``)."""
        return self.analysis.findings(self.threshold, self.min_size_ml)

    def with_median(self, median: bool) -> "ScanSession":
        """The session with the median filter on or off: the post-processing is redone from the
        cached model-space map (the network does not run), the user's choices are kept."""
        return replace(self, analysis=self.analysis.with_median(median))

    def evaluate(self, truth: np.ndarray, *, threshold: float | None = None) -> CaseEvaluation:
        """The analysis against a lesion mask on the scan's grid, at the session's minimum size
        and threshold (or ``threshold``): the numbers ``brain-uad evaluate`` reports."""
        return evaluate_analysis(self.analysis, truth, threshold=self.threshold if threshold is None else threshold,
                                 min_size_ml=self.min_size_ml)


def _score_range(analysis: ScanAnalysis) -> tuple[float, float]:
    low, high = analysis.filtered.score_range()
    return low, high if high > low else low + _FLAT_MAP_WIDTH
