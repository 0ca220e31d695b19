"""The controls that act on results already computed: threshold and preset, minimum lesion size,
median switch. None of them runs the network: the slider and the size redo the proposal from
the session's cached map, the median switch re-filters the map in a worker.

They read and change the session in the dock's state; the user's changes are announced there
(``DockState.edited``: a worklist saves them), and the review redraws the proposal and the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, FloatSlider, FloatSpinBox
from qtpy.QtCore import QTimer

from ._worker import start_refilter
from .thresholds import stored_thresholds

if TYPE_CHECKING:
    from ._review import FindingsReview
    from .dock_state import DockState
    from .session import ScanSession

NO_PRESET = "—"


class ResultControls:
    """Threshold, preset, minimum size and median (not a widget: the dock lays them out)."""

    def __init__(self, state: DockState, review: FindingsReview, parent_native, *,
                 closing: Callable[[], bool], failed: Callable[[str], None]):
        self._state = state
        self._review = review
        self._closing = closing  # whether the window is closing: no new work then
        self._fail = failed
        self.threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, value=0.5, enabled=False)
        self.threshold_preset = ComboBox(label="Preset", choices=[NO_PRESET], value=NO_PRESET,
                                         tooltip="thresholds calibrated with the model for this scorer")
        self.min_size_ml = FloatSpinBox(label="Min lesion (mL)", min=0.0, max=100.0, step=0.01, value=0.056)
        self.median = CheckBox(label="Median filter", value=True,
                               tooltip="5×5×5 median of the map (post-processing only: the model does not run again)")
        self.median_worker = None
        self.threshold_preset.changed.connect(self._preset_chosen)
        self.median.changed.connect(self._median_changed)
        self.threshold.changed.connect(self._threshold_moved)
        self.min_size_ml.changed.connect(self._min_size_changed)
        # The findings table (components, volumes, scores, decisions) costs more than the
        # proposal itself, so it follows the slider once it rests for a moment.
        self.findings_timer = QTimer(parent_native)  # dies with the widget, never fires after it
        self.findings_timer.setSingleShot(True)
        self.findings_timer.setInterval(250)
        self.findings_timer.timeout.connect(review.refresh_table)

    @property
    def widgets(self) -> list:
        return [self.threshold, self.threshold_preset, self.min_size_ml, self.median]

    def show_presets(self, metadata: dict, scorer: str) -> None:
        """The model's thresholds that were calibrated for the chosen scorer."""
        names = list(stored_thresholds(metadata, scorer))
        with self.threshold_preset.changed.blocked():
            self.threshold_preset.choices = [NO_PRESET, *names]
            self.threshold_preset.value = NO_PRESET

    def keep_preset(self, preset: str) -> None:
        """Choose ``preset`` again (silently) when it is still offered."""
        if preset in self.threshold_preset.choices:
            with self.threshold_preset.changed.blocked():
                self.threshold_preset.value = preset

    def show_session(self, session: ScanSession) -> None:
        """A session's own choices in the controls (without echoing back as the user's)."""
        with self.min_size_ml.changed.blocked(), self.median.changed.blocked():
            self.min_size_ml.value = session.min_size_ml
            self.median.value = session.analysis.filtered.median
        self.show_threshold()

    def show_threshold(self):
        """The slider and the preset as the session has them (without echoing back as a move)."""
        session = self._state.session
        low, high = session.threshold_range
        with self.threshold.changed.blocked():
            self.threshold.range = (low, high)
            self.threshold.step = (high - low) / 1000
            self.threshold.value = session.threshold
        self.threshold.enabled = True
        with self.threshold_preset.changed.blocked():
            # The presets listed are those of the model and scorer now chosen, which the user
            # may have changed since the run.
            preset = session.preset
            self.threshold_preset.value = preset if preset in self.threshold_preset.choices else NO_PRESET

    def _user_changed(self) -> None:
        """The proposal follows at once, the table once the user rests; the change is announced."""
        self._review.refresh_proposal()  # the user's own layer is never written here
        self.findings_timer.start()
        self._state.edited()

    def _threshold_moved(self, *_):
        if self._state.session is None:
            return
        self._state.session.set_threshold(self.threshold.value)
        with self.threshold_preset.changed.blocked():
            self.threshold_preset.value = NO_PRESET
        self._user_changed()

    def _preset_chosen(self, *_):
        """A preset is a shortcut to its threshold; choosing none leaves the slider where it is."""
        name = self.threshold_preset.value
        session = self._state.session
        if session is None or name == NO_PRESET:
            return
        message = session.apply_preset(name)
        if message is not None:
            self._state.status = message
        self.show_threshold()
        self._user_changed()

    def _min_size_changed(self, *_):
        if self._state.session is None:
            return
        self._state.session.min_size_ml = self.min_size_ml.value
        self._user_changed()

    def _median_changed(self, *_):
        """Median on/off after a run: redo the post-processing in a worker; the model does not run."""
        if self._state.session is None or self.median_worker is not None or self._closing():
            return
        source = self._state.session
        self._state.status = "Post-processing…"
        self.median_worker = start_refilter(source, self.median.value,
                                            done=lambda session: self._refiltered(source, session),
                                            failed=self._fail, finished=self._median_finished)

    def _refiltered(self, source: ScanSession, session: ScanSession):
        if self._state.session is not source:
            return  # a new run replaced the session while the filter ran
        self._state.session = session  # the map layer's copy follows (``on_session``)
        self.show_threshold()
        self._review.refresh()
        self._state.edited()
        median = session.analysis.filtered.median
        self._state.status = f"Median filter {'on' if median else 'off'}: {len(self._state.findings)} finding(s)."

    def _median_finished(self):
        self.median_worker = None
        session = self._state.session
        if session is not None and session.analysis.filtered.median != self.median.value:
            self._median_changed()  # toggled again while the worker ran
