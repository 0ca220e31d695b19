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
- evaluation against a lesion mask with exactly the numbers ``brain-uad evaluate`` gives;
- the review of the findings: each is open, accepted or rejected. The user's mask — their own
  strokes plus the findings they accepted — lives in its own layer, which the slider never
  writes; the session only says which voxels a decision adds to it or takes from it, keeps the
  rejected voxels, and proposes what is still open. A finding's status is read off those masks
  at the current threshold (the slider reshapes findings; a decision stays with the voxels it
  was made on), so no decision is lost when the slider moves.

Everything here is on the scan's own (source) grid; turning it into layers is the widget's job.
No Qt or napari import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .analysis import ScanAnalysis
from .evaluation import CaseEvaluation, evaluate_analysis
from .postprocess import findings_table
from .thresholds import StoredThreshold, default_threshold, stored_thresholds

# The width given to a map whose scores are all equal, so a slider over it still has a range.
_FLAT_MAP_WIDTH = 1e-6

OPEN, ACCEPTED, REJECTED = "open", "accepted", "rejected"
PART_ACCEPTED, PART_REJECTED = "partly accepted", "partly rejected"
# A finding takes the decision that covers at least this share of its voxels; one with fewer
# decided voxels is "partly" decided: at a lower threshold an accepted finding may merge into a
# larger region, or a rejected one grow, and the user has not seen the new part yet.
DECIDED_SHARE = 0.9
# A finding whose centre lies within this distance of the brain's midline is on neither side.
MIDLINE_MM = 5.0


@dataclass(frozen=True)
class Finding:
    """One component of the proposed mask, for the review table."""

    number: int  # 1 = the largest, as in ``labels_at``
    voxels: int
    volume_ml: float
    mean_score: float
    max_score: float
    centre_voxel: tuple[float, float, float]  # the scan's source grid
    axial_slice: int  # napari's axial slider position at its centre
    side: str  # the patient's "right", "left", or "midline"
    status: str  # OPEN, ACCEPTED, REJECTED, PART_ACCEPTED or PART_REJECTED


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
    rejected: np.ndarray | None = field(default=None, repr=False)  # bool, the scan's grid

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

    def carry_over(self, previous: "ScanSession | None") -> None:
        """A re-run of the scan ``previous`` was on keeps the user's choices there: the
        rejected voxels stand, and so does a threshold of the user's own (not a preset) when the
        new map is on the same scale — the same model and scorer — and the threshold lies within
        its scores. A preset is a choice too: the new session starts at the same preset, as
        :meth:`start` already did. Nothing carries over from another scan."""
        if previous is None or previous is self:
            return
        before, now = previous.analysis.scan, self.analysis.scan
        if before.geometry.source != now.geometry.source or before.data.shape != now.data.shape:
            return
        if previous.rejected is not None:
            self.rejected = previous.rejected.copy()
        same_scale = previous.scorer == self.scorer and dict(previous.model_metadata) == dict(self.model_metadata)
        low, high = self.threshold_range
        if previous.preset is None and same_scale and low <= previous.threshold <= high:
            self.threshold, self.preset = previous.threshold, None
        elif previous.preset is not None and previous.preset in self.presets:
            self.apply_preset(previous.preset)

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

    # ------------------------------------------------------------------ reviewing the findings

    def review(self, annotation: np.ndarray | None = None) -> list[Finding]:
        """The findings at the current threshold and minimum size, largest first, each with
        where it is and its status given the user's mask ``annotation`` (the scan's grid)."""
        filtered = self.analysis.filtered
        labels = self.analysis.labels_at(self.threshold, self.min_size_ml)
        rows = findings_table(labels, filtered.values, filtered.spacing_mm)  # labelled once, for both
        count = int(labels.max()) + 1
        # Voxels of each finding in the user's mask and among the rejected ones, in one pass each.
        accepted = np.zeros(count, np.int64) if annotation is None else \
            np.bincount(labels[np.asarray(annotation) > 0], minlength=count)
        rejected = np.zeros(count, np.int64) if self.rejected is None else \
            np.bincount(labels[self.rejected], minlength=count)
        geometry = self.analysis.scan.geometry
        midline_x = self._brain_centre_x()
        findings = []
        for row in rows:
            if accepted[row["label"]] >= DECIDED_SHARE * row["voxels"]:
                status = ACCEPTED
            elif rejected[row["label"]] >= DECIDED_SHARE * row["voxels"]:
                status = REJECTED
            elif accepted[row["label"]] >= rejected[row["label"]] and accepted[row["label"]] > 0:
                status = PART_ACCEPTED
            elif rejected[row["label"]] > 0:
                status = PART_REJECTED
            else:
                status = OPEN
            centre = tuple(row["centre_voxel"])
            x = float((geometry.affine @ np.append(centre, 1.0))[0])  # RAS: +x is the patient's right
            side = "midline" if abs(x - midline_x) <= MIDLINE_MM else ("right" if x > midline_x else "left")
            findings.append(Finding(
                number=row["label"], voxels=row["voxels"], volume_ml=row["volume_ml"],
                mean_score=row["mean_score"], max_score=row["max_score"], centre_voxel=centre,
                axial_slice=int(round(geometry.source_index_to_display_index(centre)[0])), side=side,
                status=status))
        return findings

    def finding_mask(self, number: int) -> np.ndarray:
        """The voxels of finding ``number`` at the current threshold (bool, the scan's grid)."""
        return self.analysis.labels_at(self.threshold, self.min_size_ml) == number

    def accept(self, number: int) -> np.ndarray:
        """Accept finding ``number``: it is no longer rejected; returns the voxels to add to the
        user's mask."""
        voxels = self.finding_mask(number)
        if self.rejected is not None:
            self.rejected &= ~voxels
        return voxels

    def reject(self, number: int) -> np.ndarray:
        """Reject finding ``number``: its voxels are remembered as rejected; returns them, to be
        taken out of the user's mask if they were in it."""
        voxels = self.finding_mask(number)
        self.rejected = voxels.copy() if self.rejected is None else self.rejected | voxels
        return voxels

    def open_proposal(self, annotation: np.ndarray | None = None) -> np.ndarray:
        """What the model still proposes (uint8, the scan's grid): the proposed mask without the
        voxels the user has in their mask or rejected."""
        # A slider step computes this. Only the proposed voxels (a few per thousand) are looked up
        # in the user's mask and among the rejected ones: the user's mask is stored in the
        # display's axis order, and masking the whole volume across the two orders took two
        # thirds of the step's own time. In place on the fresh mask: no full-volume copies.
        open_voxels = np.ascontiguousarray(self.proposed_mask()).view(bool)
        proposed = np.flatnonzero(open_voxels)
        taken = np.zeros(proposed.size, dtype=bool)
        if annotation is not None:
            taken |= np.asarray(annotation)[np.unravel_index(proposed, open_voxels.shape)] > 0
        if self.rejected is not None:
            taken |= np.asarray(self.rejected).reshape(-1)[proposed]
        open_voxels.reshape(-1)[proposed[taken]] = False  # contiguous: the reshape is a view
        return open_voxels.view(np.uint8)

    def _brain_centre_x(self) -> float:
        """The brain's centre along the scanner's right-left axis (mm): the midline for "side"."""
        if not hasattr(self, "_midline_x"):
            centre = _centre_of(self.analysis.brain_mask)
            self._midline_x = float((self.analysis.scan.geometry.affine @ np.append(centre, 1.0))[0])
        return self._midline_x

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


def _centre_of(mask: np.ndarray) -> np.ndarray:
    """The mean voxel index of a mask's voxels (the volume's centre when it is empty), from its
    projections on each axis: a tenth of the time of listing every voxel, on the GUI thread."""
    mask = np.asarray(mask, dtype=bool)
    centre = (np.asarray(mask.shape, dtype=float) - 1) / 2
    for axis in range(mask.ndim):
        profile = mask.sum(axis=tuple(other for other in range(mask.ndim) if other != axis), dtype=np.int64)
        if profile.sum():
            centre[axis] = float(np.arange(mask.shape[axis]) @ profile) / float(profile.sum())
    return centre
