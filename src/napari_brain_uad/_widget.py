"""The main dock widget: layout and wiring around the Qt-free core.

It lays out the worklist, the inputs (scan, brain mask, and ``_model_controls``' model, card and
analysis settings), Run and Cancel, the results (``_result_controls``' threshold and preset,
minimum lesion size, median switch; ``_review``'s findings) and ``_export``'s exports, and
connects them. What the dock knows at a time — the worklist scan in view, its session and
typicality, the edits not exported, the status line — is one ``dock_state.DockState`` per dock,
which every part reads and writes; the parts get that state and narrow callbacks, never this
widget. The rules it shows come from the core: the model's card and defaults from
``model_card`` and ``scoring``, the threshold's start, range and presets, the proposed mask and
the findings from ``session.ScanSession``; the analysis runs through ``_worker``; a session
becomes layers on the scan's display grid through ``_result_layers``.

The dock is laid out to stay narrow (the scan keeps most of the window, down to 1280 × 800):
long texts wrap, the model card's training details sit behind a "Model details" switch, and
combo boxes and the findings table do not widen to fit their longest entry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import napari
import numpy as np
from magicgui.widgets import CheckBox, Container, Label, ProgressBar, PushButton, create_widget
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QHeaderView, QLabel, QSizePolicy

from ._export import Exports, file_name_of_layer
from ._model_controls import FILE_CHOICE, ModelControls
from ._result_controls import NO_PRESET, ResultControls
from ._result_layers import ResultLayers, StagedDisplay, run_now
from ._review import FindingsReview
from ._styles import BRAIN, finish_labels, named_after
from ._worker import ProgressRelay, finish_running_work, start_analysis
from ._worklist_panel import DockActions, WorklistPanel
from .dock_state import DockState
from .errors import BrainUADError, internal_error_message
from .nifti import NiftiVolume, ScanError
from .results import ScanResult

if TYPE_CHECKING:
    from .analysis import ScanAnalysis
    from .session import ScanSession

# Names the tests and scripts import from here.
__all__ = ["FILE_CHOICE", "NO_PRESET", "BrainUADError", "BrainUADWidget", "file_name_of_layer"]

# Combo boxes show this many characters and elide the rest (long layer and model names would
# otherwise set the dock's width); the full name is in the open list.
_COMBO_CHARACTERS = 14

# The parts' widgets the dock shows under its own names (tests, scripts and users reach them so).
_MODEL_WIDGETS = ("model_choice", "model_file", "model_pick", "model_headline", "model_details", "model_info",
                  "scorer", "lesion_direction", "samples", "noise_levels", "device", "settings_shown",
                  "settings_box")
_RESULT_WIDGETS = ("threshold", "threshold_preset", "min_size_ml", "median")
_EXPORT_WIDGETS = ("mask", "export_button", "export_results_button")


class BrainUADWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True, scrollable=True)
        self._viewer = viewer
        self.state = DockState()  # this dock's own: two docks never share a scan or a status line
        self._display = StagedDisplay(self.native)  # a run's results, a layer per turn of the event loop
        self._scan_shown = None  # the scan last chosen, brought on top of the other images then
        self._scan_shown_timer = QTimer(self.native)  # dies with the widget, never fires after it
        self._scan_shown_timer.setSingleShot(True)
        self._scan_shown_timer.setInterval(0)
        self._scan_shown_timer.timeout.connect(self._show_chosen_scan)
        self.scan = create_widget(annotation=napari.layers.Image, label="Scan")
        self.scan_info = Label(value="")
        self.brain_mask = create_widget(annotation=napari.layers.Labels, label="Brain mask",
                                        options={"nullable": True})
        self.models = ModelControls(scan_layer=lambda: self.scan.value)
        self.review = FindingsReview(viewer, self.state)
        self.results = ResultControls(self.state, self.review, self.native, closing=lambda: self._closing,
                                      failed=self._fail)
        self.layers = ResultLayers(viewer, self.state)
        self.worklist = WorklistPanel(viewer, self.state, DockActions(
            choose_scan=self._choose_scan, choose_brain_mask=self._choose_brain_mask,
            show_session=self.show_session, finish_showing=self._display.finish,
            clear_results=self.clear_results,
            keep_saved_annotation=self.review.keep_saved_annotation, model_source=self.model_source,
            model_path=self.model_path, model_source_for=self.model_source_for,
            analysis_settings=self.analysis_settings))
        self.exports = Exports(self.state, lambda: self.native, exported=self.worklist.exported,
                               suggestion=self.worklist.export_suggestion)
        for names, part in ((_MODEL_WIDGETS, self.models), (_RESULT_WIDGETS, self.results),
                            (_EXPORT_WIDGETS, self.exports)):
            for name in names:
                setattr(self, name, getattr(part, name))
        self._findings_timer = self.results.findings_timer
        # Two folds keep the review (threshold, findings, decisions) on screen in a 1280 × 800
        # window with a worklist open; folded, each switch names what it holds. The analysis
        # settings (the model's defaults serve a reader; a researcher opens them) start folded;
        # the scan and model fold themselves once results are shown.
        self.setup_shown = CheckBox(value=True, tooltip="the scan, its brain mask, the model and the analysis settings")
        self.setup_box = Container(widgets=[self.scan, self.scan_info, self.brain_mask, *self.models.model_widgets,
                                            self.settings_shown, self.settings_box], labels=True)
        self.setup_box.margins = (0, 0, 0, 0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=1000, value=0)
        self.status = Label(value="")
        self.extend([
            self.worklist, self.setup_shown, self.setup_box,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.progress, *self.results.widgets, self.review, *self.exports.widgets, self.status,
        ])
        self._worker = None
        self._setup_folded_once = False
        self._cancel = threading.Event()
        self._relay = ProgressRelay()
        self._relay.changed.connect(self._show_progress)
        self.state.on_status.append(self._show_status)
        self.scan.changed.connect(self._scan_changed)
        self.models.on_scorer.append(self._scorer_changed)
        for switch_or_setting in (self.settings_shown, self.setup_shown, self.scan, self.model_choice, self.scorer,
                                  self.lesion_direction, self.samples, self.noise_levels, self.device):
            switch_or_setting.changed.connect(self._show_folds)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        # A worklist saves what is pending before the window closes, so nothing saved is asked
        # about (edits as they come: ``state.on_edit``).
        self.review.before_close.append(self.worklist.save_now)
        # Once the window closes, running work is cancelled and waited for while the widgets
        # it reports to still exist. The window is watched from when the dock sits in it.
        self.review.on_close.append(self.end_work)
        self._closing = False
        self._scan_shown_timer.start()  # the scan chosen when the dock opens, among layers already open
        self._watch_timer = QTimer(self.native)  # dies with the widget, never fires after it
        self._watch_timer.setSingleShot(True)
        self._watch_timer.timeout.connect(self.review.watch_window)
        self._watch_timer.start(0)
        _fit_narrow(self)
        self._show_scan_info()
        self.models.model_changed()
        self._show_folds()

    # The dock's state and its parts, under the names tests, scripts and the worklist use.

    @property
    def session(self) -> ScanSession | None:
        """The latest run's results and the user's choices on them (the dock's state holds it)."""
        return self.state.session

    @property
    def typicality(self):
        """Of the results shown (typicality.Typicality), when the model stores one."""
        return self.state.typicality

    @property
    def model_chosen_by_user(self) -> bool:
        return self.models.chosen_by_user

    @property
    def _model_metadata(self) -> dict:
        return self.models.metadata

    @property
    def _median_worker(self):
        return self.results.median_worker

    def model_source(self):
        return self.models.model_source()

    def model_path(self) -> Path | None:
        return self.models.model_path()

    def model_source_for(self, path: str | Path, *names: str):
        return self.models.model_source_for(path, *names)

    def analysis_settings(self):
        return self.models.analysis_settings(median=self.median.value)

    def export_mask(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return self.exports.export_mask(path, overwrite=overwrite)

    def export_results(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        return self.exports.export_results(folder, overwrite=overwrite)

    @property
    def native(self):
        """The scroll area around the form. napari docks a widget's ``native``; docking the scroll
        area (not the form inside it, magicgui's ``native`` for a scrollable container) makes a form
        taller than the window scroll instead of being cut off at the bottom."""
        return self.root_native_widget

    def _show_status(self, text: str) -> None:
        self.status.value = text

    def reset_choices(self, *_):  # napari calls this when layers are added or removed
        preset = self.threshold_preset.value
        super().reset_choices()  # also puts every ComboBox back to its initial choices
        _outline_brain_masks(self._viewer)
        self.exports.follow_layers()
        self._scan_changed()
        self._show_presets()
        self.results.keep_preset(preset)

    # ------------------------------------------------------------------ what the inputs are

    def _choose_scan(self, layer) -> None:
        self.scan.reset_choices()
        self.scan.value = layer

    def _choose_brain_mask(self, layer) -> None:
        self.brain_mask.reset_choices()
        self.brain_mask.value = layer

    def _scan_changed(self, *_):
        self._show_scan_info()
        self.models.scan_changed()
        # Brought on top once the choice has settled: while napari re-lists the layers the chooser
        # passes through other values, and a new choice is not a layer added elsewhere.
        self._scan_shown_timer.start()

    def _show_chosen_scan(self) -> None:
        layer = self.scan.value
        if layer is not None and layer is not self._scan_shown:
            self._scan_shown = layer
            _show_on_top(self._viewer, layer)

    def _scorer_changed(self, presets_only: bool = False) -> None:
        """The presets follow the scorer (and the model); the median switch starts as the
        scorer's paper has it (off for PHANES's map) for the next run, without re-filtering the
        results shown."""
        from .scoring import SCORERS

        self._show_presets()
        if not presets_only and self.scorer.value in SCORERS:
            with self.median.changed.blocked():
                self.median.value = SCORERS[self.scorer.value].median_filtered

    def _show_presets(self, *_):
        self.results.show_presets(self.models.metadata, self.scorer.value)

    def _show_scan_info(self):
        self.scan_info.value = _describe_scan(self.scan.value)

    def _show_folds(self, *_):
        """The scan-and-model and analysis-settings folds, open or folded; folded, each switch
        names what it holds."""
        self.settings_box.visible = self.settings_shown.value
        self.setup_box.visible = self.setup_shown.value
        settings = self.models.settings_summary()
        self.settings_shown.text = "Analysis settings" + ("" if self.settings_shown.value else f": {settings}")
        scan = self.scan.value.name if self.scan.value is not None else "no scan"
        summary = f"{scan} · {self.model_choice.value} · {settings}"
        self.setup_shown.text = "Scan and model" + ("" if self.setup_shown.value else f": {summary}")
        self.setup_shown.tooltip = summary  # whole, where the dock's edge cuts the switch's text

    # ------------------------------------------------------------------ running

    def run(self, *_):
        """Start the analysis in a worker thread; the viewer stays responsive."""
        try:
            layer, scan, brain, source = _scan_inputs(self.scan.value, self.brain_mask.value, self.model_source())
            settings = self.analysis_settings()
        except BrainUADError as error:
            self._fail(str(error))
            return
        except Exception as error:  # a bug, not the user's inputs
            self._fail(internal_error_message(error, "the analysis's inputs"))
            return
        if self._closing:
            return
        self._display.finish()  # the last run's results complete before this run starts
        _show_on_top(self._viewer, layer)  # what is analysed is what the user sees under its results
        self.review.watch_window()
        self._cancel.clear()
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.state.status = "Running…"
        self.state.analysing = True
        self._worker = start_analysis(
            scan, brain, source, settings, relay=self._relay, cancel=self._cancel,
            done=lambda analysis, metadata: self._show_results(layer, analysis, metadata),
            cancelled=self._cancelled, failed=self._fail, finished=self._finished,
        )

    @property
    def running(self) -> bool:
        """Whether an analysis of the scan in view is under way."""
        return self._worker is not None

    def clear_results(self) -> None:
        """No results in the dock (another scan is in view, not run yet): the slider and the
        findings wait for a run."""
        self._display.finish()  # the scan left has all of its results first
        self.review.clear()  # the state's session, typicality and findings go with it
        self.threshold.enabled = False
        self.state.status = ""

    def cancel(self, *_):
        self._cancel.set()
        self.state.status = "Cancelling…"

    def end_work(self, timeout_s: float = 30.0) -> bool:
        """The window closes: cancel the analysis and the worklist's background run, start
        nothing new, and wait until every worker has ended and reported (True when all did in
        time). The saved session is already written (``review.before_close``)."""
        self._display.finish()  # results being shown are shown (and a worklist's saved) first
        self._closing = True
        self._cancel.set()
        self.worklist.closing()
        return finish_running_work(timeout_s)

    def _show_progress(self, fraction: float, stage: str):
        self.progress.value = int(round(1000 * fraction))
        self.progress.label = stage

    def _cancelled(self):
        self.state.status = "Cancelled; nothing was added."
        self.progress.value = 0

    def _fail(self, message: str):
        self.state.status = f"Error: {message}"
        napari.utils.notifications.show_error(message)

    def _finished(self):
        self._display.after(self._run_ended)  # the run ends for the user once its results are shown

    def _run_ended(self):
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self._worker = None
        self.state.analysing = False

    # ------------------------------------------------------------------ results

    def _show_results(self, scan_layer, analysis: ScanAnalysis, metadata: dict):
        from .session import ScanSession

        if self._closing:
            return  # finished as the window closed: nothing to show it in

        session = ScanSession.start(analysis, metadata, min_size_ml=self.min_size_ml.value)
        session.carry_over(self.session)  # a re-run keeps the user's rejections and threshold
        self.cancel_button.enabled = False  # the results are in: nothing left to cancel

        def steps():
            yield from self._session_steps(scan_layer, session)
            self.worklist.run_finished(scan_layer, session)

        self._display.start(steps())  # one layer per turn of the event loop: the window never freezes long

    def show_session(self, scan_layer, session: ScanSession, annotation: np.ndarray | None = None, *,
                     then: Callable[[], None] | None = None):
        """A session's results as layers over ``scan_layer``, its choices in the controls.
        ``annotation`` (the scan's grid): the user's mask as saved, for a scan that has no
        annotation layer in the viewer (a worklist scan reopened). All at once; with ``then``, a
        layer per turn of the event loop (the window stays live), and ``then()`` once all is shown."""
        if then is None:
            self._display.finish()
            run_now(self._session_steps(scan_layer, session, annotation))
            return
        self._display.start(self._session_steps(scan_layer, session, annotation))
        self._display.after(then)

    def _session_steps(self, scan_layer, session: ScanSession, annotation: np.ndarray | None = None):
        """``show_session``'s work, pausing after each layer napari adds."""
        placement, brain = yield from self.layers.show_steps(scan_layer, session)
        if brain is not None:  # the run found the brain itself: the next run uses it (as corrected)
            self._choose_brain_mask(brain)
        yield from self.review.show_steps(session, scan_layer, placement, annotation=annotation)
        yield
        if not self._setup_folded_once:  # the first results make room for the review; then the user decides
            self._setup_folded_once = True
            self.setup_shown.value = False
        self.results.show_session(session)
        self.exports.choose_annotation()
        result = ScanResult.of(session.analysis, session.model_metadata)
        self.state.typicality = result.typicality
        self.state.status = f"Done: {result.summary_line(len(self.state.findings))}."
        if result.atypical:
            napari.utils.notifications.show_warning(result.typicality.describe())


def _fit_narrow(dock: BrainUADWidget) -> None:
    """Let nothing set a wide minimum: texts wrap, combo boxes elide, and what has no row label
    (texts, the findings table) spans the dock's width instead of sitting beside an empty one."""
    for widget in (*dock, *dock.setup_box, *dock.settings_box):
        row = widget.native.parentWidget()
        layout = row.layout() if row is not None else None
        # magicgui puts each labelled widget in a row of two: its label, then the widget.
        if not widget.label and layout is not None and layout.count() == 2 \
                and layout.itemAt(1).widget() is widget.native:
            empty_label = layout.itemAt(0).widget()
            if isinstance(empty_label, QLabel):
                empty_label.hide()
    for label in (dock.worklist.title, dock.scan_info, *dock.models.labels, dock.review.title, dock.status):
        text = label.native
        text.setWordWrap(True)
        policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        policy.setHeightForWidth(True)  # a wrapped text grows down as the dock narrows
        text.setSizePolicy(policy)
    for switch in (dock.setup_shown, dock.settings_shown):
        # A folded switch names what it holds, which may be long: cut at the dock's edge
        # rather than widening the dock (the whole text is in the open fold).
        switch.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    for combo in dock.native.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(_COMBO_CHARACTERS)
    # Columns as wide as their header and numbers; a narrower dock scrolls the table sideways
    # rather than cutting its headers in half.
    for table in (dock.review.table.native, dock.worklist.table.native):
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    dock.review.table.native.verticalHeader().setVisible(False)  # the "#" column already numbers the rows


def _show_on_top(viewer, scan_layer) -> None:
    """The scan chosen for analysis is the image the user sees: shown, and above every other
    image except its own results. Several contrasts opened at once (``make napari`` opens T1,
    T2 and FLAIR) otherwise leave the last one on top, and the T1's map would be read over the
    FLAIR."""
    layers = viewer.layers
    if scan_layer not in layers:
        return
    scan_layer.visible = True
    covering = [index for index, layer in enumerate(layers)
                if isinstance(layer, napari.layers.Image) and layer is not scan_layer and layer.visible
                and not named_after(layer.name, scan_layer.name)]
    index = layers.index(scan_layer)
    if covering and max(covering) > index:
        layers.move(index, max(covering) + 1)


def _outline_brain_masks(viewer) -> None:
    """Brain masks opened from disk are drawn as outlines, as the dock's own brain layers are
    (a filled mask hides the anatomy); once, so a user's own choice of look then stands."""
    for layer in viewer.layers:
        if isinstance(layer, napari.layers.Labels) and layer.metadata.get("role") == BRAIN \
                and not layer.metadata.get("outlined"):
            layer.metadata["outlined"] = True
            finish_labels(layer, BRAIN)


def _describe_scan(layer) -> str:
    """What the dock says of the scan chosen: its file, orientation, size and spacing."""
    if layer is None:
        return "Open a NIfTI scan (File > Open, or File > Open Sample)."
    geometry = layer.metadata.get("nifti")
    if geometry is None:
        return f"{layer.name}: not opened from NIfTI; masks cannot be exported."
    spacing = " × ".join(f"{s:.3g}" for s in geometry.spacing)
    shape = " × ".join(str(n) for n in geometry.shape)
    oblique = ", oblique (shown axis-aligned)" if geometry.is_oblique else ""
    return f"{Path(geometry.source).name}\nstored {''.join(geometry.axcodes)}, {shape} voxels of {spacing} mm{oblique}"


def _scan_inputs(layer, brain_layer, source):
    """The scan (and brain mask) on the source grid, and the model; errors say what is missing."""
    if layer is None:
        raise BrainUADError("open a scan first (File > Open, or File > Open Sample)")
    geometry = layer.metadata.get("nifti")
    if geometry is None or layer.data.ndim != 3:
        raise ScanError(f"{layer.name}: a 3D scan opened from NIfTI is needed (its geometry is unknown)")
    scan = NiftiVolume(data=np.asarray(geometry.to_source(np.asarray(layer.data)), dtype=np.float32),
                       geometry=geometry)
    brain = None
    if brain_layer is not None:
        brain = geometry.to_source(np.asarray(brain_layer.data)) > 0
    if source is None:
        raise BrainUADError("choose a model checkpoint first")
    return layer, scan, brain, source
