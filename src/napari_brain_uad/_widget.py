"""The main dock widget: layout and wiring around the Qt-free core.

It lays out the inputs (scan, brain mask, model — the one ``model_registry`` picks for the scan's
contrast until the user chooses one —, scorer, samples, noise level, device), Run and
Cancel, the results (threshold and preset, minimum lesion size, median switch, findings) and
the exports, and connects them. The rules it shows come from the core: the model's card and
defaults from ``model_card`` and ``scoring``, the threshold's start, range and presets, the
proposed mask and the findings from ``session.ScanSession``; the analysis runs through
``_worker``; the findings' review, the model's proposal layer and the user's own annotation
layer (which no slider or re-run overwrites) through ``_review``; a worklist of scans, its
session saved as the user works, through ``_worklist_panel``. What is left here is turning a
session into layers on the scan's own display grid (reconstruction, anomaly map, spread, brain)
and the export dialogs.

The dock is laid out to stay narrow (the scan keeps most of the window, down to 1280 × 800):
long texts wrap, the model card's training details sit behind a "Model details" switch, and
combo boxes and the findings table do not widen to fit their longest entry.

How the result layers look (colours, opacities, names) comes from ``_styles``.

The anomaly map layer carries the session (``metadata["session"]``), which the Evaluate widget
reads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QHeaderView, QLabel, QSizePolicy

from . import model_card
from ._styles import BRAIN, REFERENCE, anomaly_map_limits, anomaly_map_style, finish_labels, label_style, layer_name
from ._review import FindingsReview
from ._worklist_panel import WorklistPanel
from ._worker import ProgressRelay, finish_running_work, start_analysis, start_refilter
from ._writer import write_layer
from .brain_mask import GIVEN
from .errors import BrainUADError, internal_error_message
from .nifti import NiftiVolume, ScanError
from .model_registry import (
    default_model_name,
    guess_contrast,
    local_model_file,
    model_for_contrast,
    model_names,
    read_scan_contrast,
    scan_contrast,
)
from .results import ScanResult
from .scoring import SCORERS, scorer_names
from .thresholds import stored_thresholds

if TYPE_CHECKING:
    from .analysis import ScanAnalysis
    from .session import ScanSession

FILE_CHOICE = "checkpoint file…"
# How a user of the dock overrides the model picked for the scan's contrast.
PICK_HINT = "choose another above"
NO_PRESET = "—"
WARNING_MARK = "⚠"  # starts a line of the model card that must stay in view

# Combo boxes show this many characters and elide the rest (long layer and model names would
# otherwise set the dock's width); the full name is in the open list.
_COMBO_CHARACTERS = 14


class BrainUADWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True, scrollable=True)
        self._viewer = viewer
        self.worklist = WorklistPanel(self, viewer)
        self.scan = create_widget(annotation=napari.layers.Image, label="Scan")
        self.scan_info = Label(value="")
        self.brain_mask = create_widget(annotation=napari.layers.Labels, label="Brain mask",
                                        options={"nullable": True})
        self.model_choice = ComboBox(label="Model", choices=[*model_names(), FILE_CHOICE], value=default_model_name())
        self.model_file = FileEdit(label="Checkpoint", filter="*.safetensors", value="", visible=False)
        self.model_pick = Label(value="", visible=False)  # which model the scan's contrast picked, and why
        self.model_headline = Label(value="")  # the card's first line and any warning: always shown
        self.model_details = CheckBox(text="Model details", value=False,
                                      tooltip="the whole model card: what the model is and what it was trained on")
        self.model_info = Label(value="", visible=False)  # the whole card, behind "Model details"
        self.scorer = ComboBox(label="Scorer", choices=list(SCORERS), value=model_card.FALLBACK_SCORER)
        self.lesion_direction = CheckBox(
            text="Lesion direction only", value=False,
            tooltip="count only deviations the model's contrast gives lesions: darker on T1, brighter on T2/FLAIR")
        self.samples = SpinBox(label="Samples (N)", min=1, max=50, value=1)
        self.noise_levels = ComboBox(label="Noise level", choices=["model's t_test", "250, 500, 750"],
                                     value="model's t_test")
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        # Two folds keep the review (threshold, findings, decisions) on screen in a 1280 × 800
        # window with a worklist open; folded, each switch names what it holds. The analysis
        # settings (the model's defaults serve a reader; a researcher opens them) start folded;
        # the scan and model fold themselves once results are shown.
        self.settings_shown = CheckBox(value=False, tooltip="scorer, lesion direction, samples, noise level, device")
        self.settings_box = Container(widgets=[self.scorer, self.lesion_direction, self.samples, self.noise_levels,
                                               self.device], labels=True)
        self.setup_shown = CheckBox(value=True, tooltip="the scan, its brain mask, the model and the analysis settings")
        self.setup_box = Container(widgets=[
            self.scan, self.scan_info, self.brain_mask, self.model_choice, self.model_file, self.model_pick,
            self.model_headline, self.model_details, self.model_info, self.settings_shown, self.settings_box,
        ], labels=True)
        for box in (self.settings_box, self.setup_box):
            box.margins = (0, 0, 0, 0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=1000, value=0)
        self.threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, value=0.5, enabled=False)
        self.threshold_preset = ComboBox(label="Preset", choices=[NO_PRESET], value=NO_PRESET,
                                         tooltip="thresholds calibrated with the model for this scorer")
        self.min_size_ml = FloatSpinBox(label="Min lesion (mL)", min=0.0, max=100.0, step=0.01, value=0.056)
        self.median = CheckBox(label="Median filter", value=True,
                               tooltip="5×5×5 median of the map (post-processing only: the model does not run again)")
        self.review = FindingsReview(viewer)
        # What Export writes: the user's own mask, never by default a reference or brain mask
        # (exporting the expert's mask as the user's, before any run, was one click away).
        self.mask = create_widget(annotation=napari.layers.Labels, label="Mask", options={"nullable": True})
        self.export_button = PushButton(text="Export mask…")
        self.export_results_button = PushButton(text="Export map and reconstruction…")
        self.status = Label(value="")
        self.extend([
            self.worklist, self.setup_shown, self.setup_box,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.progress, self.threshold, self.threshold_preset, self.min_size_ml, self.median,
            self.review,
            self.mask, self.export_button, self.export_results_button, self.status,
        ])
        self._map_layer = None
        self.typicality = None  # of the results shown (typicality.Typicality), when the model stores one
        self._worker = None
        self._median_worker = None
        self._model_metadata: dict = {}  # the chosen model's card, {} until it can be read
        self._resolved: dict[str, Path] = {}  # registry name -> verified local file
        # Until the user chooses a model, each scan gets its contrast's; their choice then holds.
        self.model_chosen_by_user = False
        self._mask_chosen_by_user = False  # else Export writes the scan's annotation layer, or nothing
        self._setup_folded_once = False
        self._picking_model = False  # the dock itself is setting the model choice
        self._cancel = threading.Event()
        self._relay = ProgressRelay()
        self._relay.changed.connect(self._show_progress)
        self.scan.changed.connect(self._scan_changed)
        self.model_choice.changed.connect(self._model_chosen)
        self.model_file.changed.connect(self._file_chosen)
        self.model_details.changed.connect(self._show_model_headline)
        for switch_or_setting in (self.settings_shown, self.setup_shown, self.scan, self.model_choice, self.scorer,
                                  self.lesion_direction, self.samples, self.noise_levels, self.device):
            switch_or_setting.changed.connect(self._show_folds)
        self.scorer.changed.connect(self._scorer_changed)
        self.lesion_direction.changed.connect(self._lesion_direction_changed)
        self.threshold_preset.changed.connect(self._preset_chosen)
        self.median.changed.connect(self._median_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.threshold.changed.connect(self._threshold_moved)
        self.min_size_ml.changed.connect(self._min_size_changed)
        self.export_button.changed.connect(self._ask_and_export)
        self.mask.changed.connect(self._mask_chosen)
        self.export_results_button.changed.connect(self._ask_and_export_results)
        # The findings table (components, volumes, scores, decisions) costs more than the
        # proposal itself, so it follows the slider once it rests for a moment.
        self._findings_timer = QTimer(self.native)  # dies with the widget, never fires after it
        self._findings_timer.setSingleShot(True)
        self._findings_timer.setInterval(250)
        self._findings_timer.timeout.connect(self.review.refresh_table)
        # A worklist saves the session as the user works, and before the window closes.
        self.review.on_edit.append(self.worklist.schedule_save)
        self.review.before_close.append(self.worklist.before_close)
        # Once the window closes, running work is cancelled and waited for while the widgets
        # it reports to still exist. The window is watched from when the dock sits in it.
        self.review.on_close.append(self.end_work)
        self._closing = False
        self._watch_timer = QTimer(self.native)  # dies with the widget, never fires after it
        self._watch_timer.setSingleShot(True)
        self._watch_timer.timeout.connect(self.review.watch_window)
        self._watch_timer.start(0)
        self._fit_narrow()
        self._show_scan_info()
        self._model_changed()
        self._show_folds()

    @property
    def session(self) -> ScanSession | None:
        """The latest run's results and the user's choices on them; the review holds it."""
        return self.review.session

    @property
    def native(self):
        """The scroll area around the form. napari docks a widget's ``native``; docking the scroll
        area (not the form inside it, magicgui's ``native`` for a scrollable container) makes a form
        taller than the window scroll instead of being cut off at the bottom."""
        return self.root_native_widget

    def _fit_narrow(self):
        """Let nothing set a wide minimum: texts wrap, combo boxes elide, and what has no row label
        (texts, the findings table) spans the dock's width instead of sitting beside an empty one."""
        for widget in (*self, *self.setup_box, *self.settings_box):
            row = widget.native.parentWidget()
            layout = row.layout() if row is not None else None
            # magicgui puts each labelled widget in a row of two: its label, then the widget.
            if not widget.label and layout is not None and layout.count() == 2 \
                    and layout.itemAt(1).widget() is widget.native:
                empty_label = layout.itemAt(0).widget()
                if isinstance(empty_label, QLabel):
                    empty_label.hide()
        for label in (self.worklist.title, self.scan_info, self.model_pick, self.model_headline, self.model_info,
                      self.review.title, self.status):
            text = label.native
            text.setWordWrap(True)
            policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
            policy.setHeightForWidth(True)  # a wrapped text grows down as the dock narrows
            text.setSizePolicy(policy)
        for switch in (self.setup_shown, self.settings_shown):
            # A folded switch names what it holds, which may be long: cut at the dock's edge
            # rather than widening the dock (the whole text is in the open fold).
            switch.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        for combo in self.native.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(_COMBO_CHARACTERS)
        # Columns as wide as their header and numbers; a narrower dock scrolls the table sideways
        # rather than cutting its headers in half.
        for table in (self.review.table.native, self.worklist.table.native):
            table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.review.table.native.verticalHeader().setVisible(False)  # the "#" column already numbers the rows

    def reset_choices(self, *_):  # napari calls this when layers are added or removed
        preset = self.threshold_preset.value
        super().reset_choices()  # also puts every ComboBox back to its initial choices
        self._outline_brain_masks()
        if not self._mask_chosen_by_user and not self._is_users_mask(self.mask.value):
            with self.mask.changed.blocked():
                try:
                    self.mask.value = self.review.annotation_layer  # None before any run
                except ValueError:  # the user deleted their annotation layer
                    self.mask.value = None
        self._scan_changed()
        self._show_presets()
        if preset in self.threshold_preset.choices:
            with self.threshold_preset.changed.blocked():
                self.threshold_preset.value = preset

    def _mask_chosen(self, *_):
        self._mask_chosen_by_user = self.mask.value is not None

    @staticmethod
    def _is_users_mask(layer) -> bool:
        """Whether a Labels layer may be what Export writes without the user choosing it: not a
        reference or brain mask (opened from disk, or a brain the dock found: ``metadata["role"]``)."""
        return layer is not None and layer.metadata.get("role") not in (REFERENCE, BRAIN)

    def _outline_brain_masks(self) -> None:
        """Brain masks opened from disk are drawn as outlines, as the dock's own brain layers are
        (a filled mask hides the anatomy); once, so a user's own choice of look then stands."""
        for layer in self._viewer.layers:
            if isinstance(layer, napari.layers.Labels) and layer.metadata.get("role") == BRAIN \
                    and not layer.metadata.get("outlined"):
                layer.metadata["outlined"] = True
                finish_labels(layer, BRAIN)

    # ------------------------------------------------------------------ what the inputs are

    def _scan_changed(self, *_):
        self._show_scan_info()
        self._pick_model_for_scan()
        self._show_model_info()  # its warning depends on the scan's name

    def _scan_contrast(self) -> str | None:
        """The chosen scan's contrast, as its layer's and file's names (or DICOM description) say."""
        layer = self.scan.value
        if layer is None:
            return None
        geometry = layer.metadata.get("nifti")
        return read_scan_contrast(geometry, layer.name) if geometry is not None else guess_contrast(layer.name)

    def _pick_model_for_scan(self):
        """Unless the user chose a model, the registry's model for the scan's contrast, and a line
        saying which and why."""
        if self.model_chosen_by_user or self.scan.value is None:
            self.model_pick.value, self.model_pick.visible = "", False
            return
        pick = model_for_contrast(self._scan_contrast())
        self.model_pick.value, self.model_pick.visible = pick.describe(PICK_HINT), True
        if pick.name in self.model_choice.choices and self.model_choice.value != pick.name:
            self._picking_model = True
            try:
                self.model_choice.value = pick.name
            finally:
                self._picking_model = False

    def _model_chosen(self, *_):
        """A model chosen in the list: by the user (it then holds for every scan), or by the dock
        for the scan's contrast."""
        if not self._picking_model:
            self.model_chosen_by_user = True
            self.model_pick.value, self.model_pick.visible = "", False
        self._model_changed()

    def model_source_for(self, path: str | Path, *names: str) -> str | Path | None:
        """The model a scan on disk would run with: the user's choice, else its contrast's."""
        if self.model_chosen_by_user:
            return self.model_source()
        return model_for_contrast(scan_contrast(path, *names)).name

    def _show_scan_info(self):
        layer = self.scan.value
        if layer is None:
            self.scan_info.value = "Open a NIfTI scan (File > Open, or File > Open Sample)."
            return
        geometry = layer.metadata.get("nifti")
        if geometry is None:
            self.scan_info.value = f"{layer.name}: not opened from NIfTI; masks cannot be exported."
            return
        spacing = " × ".join(f"{s:.3g}" for s in geometry.spacing)
        shape = " × ".join(str(n) for n in geometry.shape)
        oblique = ", oblique (shown axis-aligned)" if geometry.is_oblique else ""
        self.scan_info.value = (
            f"{Path(geometry.source).name}\nstored {''.join(geometry.axcodes)}, "
            f"{shape} voxels of {spacing} mm{oblique}"
        )

    def _file_chosen(self, *_):
        """Choosing a checkpoint file selects it as the model."""
        if self._chosen_file() is not None and self.model_choice.value != FILE_CHOICE:
            self.model_choice.value = FILE_CHOICE
        else:
            self._model_changed()

    def _chosen_file(self) -> Path | None:
        value = self.model_file.value
        path = Path(value) if value else None
        return path if path is not None and str(path) not in ("", ".") and path.is_file() else None

    def model_source(self) -> str | Path | None:
        """What to resolve at Run: a registry name, or the chosen checkpoint file (None: none yet)."""
        if self.model_choice.value == FILE_CHOICE:
            return self._chosen_file()
        return self.model_choice.value

    def model_path(self) -> Path | None:
        """The model's local file when it is already here (bundled, cached, or chosen), else None."""
        source = self.model_source()
        if source is None or isinstance(source, Path):
            return source
        if source not in self._resolved:
            local = local_model_file(source)  # a damaged bundled file raises
            if local is None:
                return None
            self._resolved[source] = local
        return self._resolved[source]

    def _model_changed(self, *_):
        """A new model: its card, its default scorer (with that scorer's number of
        reconstructions), and its calibrated thresholds."""
        self.model_file.visible = self.model_choice.value == FILE_CHOICE
        self._show_model_info()
        self._offer_scorers_of_model()
        directed = model_card.lesion_direction_scorer(self._model_metadata)
        self.lesion_direction.enabled = directed is not None
        scorer = directed if self.lesion_direction.value and directed else model_card.default_scorer(
            self._model_metadata)
        if self._model_metadata and scorer in SCORERS and self.scorer.value != scorer:
            self.samples.value = SCORERS[scorer].default_samples
            self.scorer.value = scorer  # its presets follow
        else:
            self._show_presets()
        self._tick_lesion_direction()

    def _offer_scorers_of_model(self):
        """Only the scorers the chosen model can feed: those needing a map the kind does not
        make (SADM's segmentation, ...) are left out."""
        from .models import MODEL_KINDS

        kind = MODEL_KINDS.get((self._model_metadata or {}).get("kind"))
        choices = scorer_names(maps=kind.extra_maps) if kind is not None else list(SCORERS)
        if list(self.scorer.choices) != choices:
            with self.scorer.changed.blocked():
                current = self.scorer.value
                self.scorer.choices = choices
                self.scorer.value = current if current in choices else choices[0]

    def _scorer_changed(self, *_):
        """The lesion-direction option shows whether the scorer is the one-way residual, whoever
        chose it; the median filter starts as the scorer's paper has it (off for PHANES's map)
        for the next run, without re-filtering the results shown."""
        self._tick_lesion_direction()
        self._show_presets()
        if self.scorer.value in SCORERS:
            with self.median.changed.blocked():
                self.median.value = SCORERS[self.scorer.value].median_filtered

    def _tick_lesion_direction(self):
        directed = model_card.lesion_direction_scorer(self._model_metadata)
        ticked = directed is not None and self.scorer.value == directed
        if self.lesion_direction.value != ticked:
            with self.lesion_direction.changed.blocked():
                self.lesion_direction.value = ticked

    def _lesion_direction_changed(self, *_):
        """On: the one-way residual of the model's contrast; off: the model's default scorer, or
        the two-way residual when that default is the one-way one."""
        directed = model_card.lesion_direction_scorer(self._model_metadata)
        default = model_card.default_scorer(self._model_metadata)
        if self.lesion_direction.value and directed:
            scorer = directed
        else:
            scorer = "residual" if default == directed else default
        if scorer in SCORERS and scorer != self.scorer.value:
            self.samples.value = SCORERS[scorer].default_samples
            self.scorer.value = scorer  # its presets follow

    def _show_model_info(self):
        """The chosen model's card, as the "Model details" switch has it."""
        self._describe_model()
        self._show_model_headline()

    def _show_folds(self, *_):
        """The scan-and-model and analysis-settings folds, open or folded; folded, each switch
        names what it holds."""
        self.settings_box.visible = self.settings_shown.value
        self.setup_box.visible = self.setup_shown.value
        noise = "" if self.noise_levels.value == "model's t_test" else f", t = {self.noise_levels.value}"
        settings = f"{self.scorer.value}, N = {self.samples.value}{noise}, {self.device.value}"
        self.settings_shown.text = "Analysis settings" + ("" if self.settings_shown.value else f": {settings}")
        scan = self.scan.value.name if self.scan.value is not None else "no scan"
        summary = f"{scan} · {self.model_choice.value} · {settings}"
        self.setup_shown.text = "Scan and model" + ("" if self.setup_shown.value else f": {summary}")
        self.setup_shown.tooltip = summary  # whole, where the dock's edge cuts the switch's text

    def _show_model_headline(self, *_):
        """The card's first line and its warnings always; the whole card when "Model details" is on.
        The switch shows only when the card says more than its headline."""
        lines = self.model_info.value.splitlines()
        headline = [line for index, line in enumerate(lines) if index == 0 or line.startswith(WARNING_MARK)]
        more = len(headline) < len(lines)
        self.model_details.visible = more
        self.model_info.visible = more and self.model_details.value
        self.model_headline.visible = not self.model_info.visible
        self.model_headline.value = "\n".join(headline)

    def _describe_model(self):
        """The chosen model's card (``model_info``, whole) and metadata, or why there is none."""
        from .checkpoint import read_metadata

        self._model_metadata = {}
        source = self.model_source()
        if source is None:
            self.model_info.value = "Choose a model checkpoint (.safetensors)."
            return
        try:
            path = self.model_path()
            if path is None:
                self.model_info.value = f"{source}: downloaded (hash-checked) when you press Run."
                return
            metadata = read_metadata(path)
        except BrainUADError as error:
            self.model_info.value = f"Not usable: {error}"
            return
        self._model_metadata = metadata
        mismatch = model_card.modality_mismatch(metadata, self._scan_contrast())
        self.model_info.value = model_card.summary(metadata) + (f"\n{WARNING_MARK} {mismatch}" if mismatch else "")

    def _show_presets(self, *_):
        """The model's thresholds that were calibrated for the chosen scorer."""
        names = list(stored_thresholds(self._model_metadata, self.scorer.value))
        with self.threshold_preset.changed.blocked():
            self.threshold_preset.choices = [NO_PRESET, *names]
            self.threshold_preset.value = NO_PRESET

    # ------------------------------------------------------------------ running

    def _inputs(self):
        """The scan (and brain mask) on the source grid, and the model; errors say what is missing."""
        layer = self.scan.value
        if layer is None:
            raise BrainUADError("open a scan first (File > Open, or File > Open Sample)")
        geometry = layer.metadata.get("nifti")
        if geometry is None or layer.data.ndim != 3:
            raise ScanError(f"{layer.name}: a 3D scan opened from NIfTI is needed (its geometry is unknown)")
        scan = NiftiVolume(data=np.asarray(geometry.to_source(np.asarray(layer.data)), dtype=np.float32),
                           geometry=geometry)
        brain = None
        if self.brain_mask.value is not None:
            brain = geometry.to_source(np.asarray(self.brain_mask.value.data)) > 0
        source = self.model_source()
        if source is None:
            raise BrainUADError("choose a model checkpoint first")
        return layer, scan, brain, source

    def analysis_settings(self):
        from .analysis import AnalysisSettings  # brings torch and MONAI: only when a run starts

        levels = None if self.noise_levels.value == "model's t_test" else (250, 500, 750)
        return AnalysisSettings(scorer=self.scorer.value, samples=self.samples.value, noise_levels=levels,
                                device=self.device.value, median=self.median.value)

    def run(self, *_):
        """Start the analysis in a worker thread; the viewer stays responsive."""
        try:
            layer, scan, brain, source = self._inputs()
            settings = self.analysis_settings()
        except BrainUADError as error:
            self._fail(str(error))
            return
        except Exception as error:  # a bug, not the user's inputs
            self._fail(internal_error_message(error, "the analysis's inputs"))
            return
        if self._closing:
            return
        self.review.watch_window()
        self._cancel.clear()
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "Running…"
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
        self.review.clear()
        self._map_layer = self.typicality = None
        self.threshold.enabled = False
        self.status.value = ""

    def cancel(self, *_):
        self._cancel.set()
        self.status.value = "Cancelling…"

    def end_work(self, timeout_s: float = 30.0) -> bool:
        """The window closes: cancel the analysis and the worklist's background run, start
        nothing new, and wait until every worker has ended and reported (True when all did in
        time). The saved session is already written (``review.before_close``)."""
        self._closing = True
        self._cancel.set()
        self.worklist.closing()
        return finish_running_work(timeout_s)

    def _show_progress(self, fraction: float, stage: str):
        self.progress.value = int(round(1000 * fraction))
        self.progress.label = stage

    def _cancelled(self):
        self.status.value = "Cancelled; nothing was added."
        self.progress.value = 0

    def _fail(self, message: str):
        self.status.value = f"Error: {message}"
        napari.utils.notifications.show_error(message)

    def _finished(self):
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self._worker = None

    # ------------------------------------------------------------------ results

    def _show_results(self, scan_layer, analysis: ScanAnalysis, metadata: dict):
        from .session import ScanSession

        if self._closing:
            return  # finished as the window closed: nothing to show it in

        session = ScanSession.start(analysis, metadata, min_size_ml=self.min_size_ml.value)
        session.carry_over(self.session)  # a re-run keeps the user's rejections and threshold
        self.show_session(scan_layer, session)
        self.worklist.run_finished(scan_layer, session)

    def show_session(self, scan_layer, session: ScanSession, annotation: np.ndarray | None = None):
        """A session's results as layers over ``scan_layer``, its choices in the controls.
        ``annotation`` (the scan's grid): the user's mask as saved, for a scan that has no
        annotation layer in the viewer (a worklist scan reopened)."""
        analysis, metadata = session.analysis, session.model_metadata
        geometry = scan_layer.metadata["nifti"]
        placement = {"scale": scan_layer.scale, "translate": scan_layer.translate,
                     "metadata": {"nifti": geometry, "model": metadata.get("kind")}}
        name = scan_layer.name
        self._replace(f"{name} reconstruction", "image", geometry.to_display(analysis.reconstruction),
                      colormap="gray", contrast_limits=scan_layer.contrast_limits, visible=False, **placement)
        self._map_layer = self._replace(
            f"{name} anomaly map", "image", geometry.to_display(analysis.anomaly_map), **anomaly_map_style(),
            contrast_limits=anomaly_map_limits(analysis.filtered.scores(), _healthy_value(session)),
            **{**placement, "metadata": {**placement["metadata"], "session": session}},
        )
        if analysis.spread is not None:
            self._replace(f"{name} spread", "image", geometry.to_display(analysis.spread), colormap="viridis",
                          blending="additive", visible=False, **placement)
        for map_name, values in analysis.model_maps.items():  # SADM's segmentation, PHANES's mask, ...
            self._replace(f"{name} {map_name}", "image", geometry.to_display(values), colormap="magma",
                          blending="additive", visible=False, **placement)
        self._show_brain(scan_layer, analysis, placement)
        self.review.show(session, scan_layer, placement, annotation=annotation)
        if not self._setup_folded_once:  # the first results make room for the review; then the user decides
            self._setup_folded_once = True
            self.setup_shown.value = False
        with self.min_size_ml.changed.blocked(), self.median.changed.blocked():
            self.min_size_ml.value = session.min_size_ml
            self.median.value = analysis.filtered.median
        self._show_threshold()
        self.mask.reset_choices()
        with self.mask.changed.blocked():
            self.mask.value = self.review.annotation_layer  # what an export writes: the user's mask
        self._mask_chosen_by_user = False
        result = ScanResult.of(analysis, metadata)
        self.typicality = result.typicality
        self.status.value = f"Done: {result.summary_line(len(self.review.findings))}."
        if result.atypical:
            napari.utils.notifications.show_warning(self.typicality.describe())

    def _show_brain(self, scan_layer, analysis: ScanAnalysis, placement: dict) -> None:
        """A brain the run found itself (skull-stripped scan, or extracted) becomes a Labels layer
        drawn as an outline, chosen as the brain mask: the user can check and correct it, and
        the next run uses it as corrected."""
        if analysis.brain.source == GIVEN:
            return
        geometry = scan_layer.metadata["nifti"]
        layer = self._replace(layer_name(BRAIN, scan_layer.name), "labels",
                              geometry.to_display(analysis.brain.mask.astype(np.uint8)), **label_style(BRAIN),
                              **{**placement, "metadata": {**placement["metadata"], "role": BRAIN}})
        finish_labels(layer, BRAIN)
        self.brain_mask.reset_choices()
        self.brain_mask.value = layer

    def _replace(self, name, kind, data, **kwargs):
        """Add a result layer, or refresh the one of the same name from an earlier run."""
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        add = self._viewer.add_labels if kind == "labels" else self._viewer.add_image
        return add(data, name=name, **kwargs)

    def _show_threshold(self):
        """The slider and the preset as the session has them (without echoing back as a move)."""
        low, high = self.session.threshold_range
        with self.threshold.changed.blocked():
            self.threshold.range = (low, high)
            self.threshold.step = (high - low) / 1000
            self.threshold.value = self.session.threshold
        self.threshold.enabled = True
        with self.threshold_preset.changed.blocked():
            # The presets listed are those of the model and scorer now chosen, which the user
            # may have changed since the run.
            preset = self.session.preset
            self.threshold_preset.value = preset if preset in self.threshold_preset.choices else NO_PRESET

    def _threshold_moved(self, *_):
        if self.session is None:
            return
        self.session.set_threshold(self.threshold.value)
        with self.threshold_preset.changed.blocked():
            self.threshold_preset.value = NO_PRESET
        self._show_mask()
        self._findings_timer.start()
        self.worklist.schedule_save()

    def _preset_chosen(self, *_):
        """A preset is a shortcut to its threshold; choosing none leaves the slider where it is."""
        name = self.threshold_preset.value
        if self.session is None or name == NO_PRESET:
            return
        message = self.session.apply_preset(name)
        if message is not None:
            self.status.value = message
        self._show_threshold()
        self._show_mask()
        self._findings_timer.start()
        self.worklist.schedule_save()

    def _min_size_changed(self, *_):
        if self.session is None:
            return
        self.session.min_size_ml = self.min_size_ml.value
        self._show_mask()
        self._findings_timer.start()
        self.worklist.schedule_save()

    def _show_mask(self):
        """The session's open proposal in the proposal layer (from the cached filtered map); the
        user's own layer is never written here."""
        self.review.refresh_proposal()

    def _median_changed(self, *_):
        """Median on/off after a run: redo the post-processing in a worker; the model does not run."""
        if self.session is None or self._median_worker is not None or self._closing:
            return
        source = self.session
        self.status.value = "Post-processing…"
        self._median_worker = start_refilter(source, self.median.value,
                                             done=lambda session: self._refiltered(source, session),
                                             failed=self._fail, finished=self._median_finished)

    def _refiltered(self, source: ScanSession, session: ScanSession):
        if self.session is not source:
            return  # a new run replaced the session while the filter ran
        if self._map_layer is not None:
            self._map_layer.metadata["session"] = session
        self.review.session = session
        self._show_threshold()
        self.review.refresh()
        self.worklist.schedule_save()
        median = session.analysis.filtered.median
        self.status.value = f"Median filter {'on' if median else 'off'}: {len(self.review.findings)} finding(s)."

    def _median_finished(self):
        self._median_worker = None
        if self.session is not None and self.session.analysis.filtered.median != self.median.value:
            self._median_changed()  # toggled again while the worker ran

    # ------------------------------------------------------------------ export

    def export_mask(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the chosen Labels layer on its scan's original grid, with the scan's affine."""
        layer = self.mask.value
        if layer is None:
            raise BrainUADError("choose a Labels layer to export")
        meta = {"name": layer.name, "metadata": layer.metadata}
        written = write_layer(str(path), layer.data, meta, kind="labels", overwrite=overwrite)
        self.review.mark_saved(layer)
        self.worklist.exported(layer)
        self.status.value = f"Saved {written}"
        return written

    def export_results(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write the anomaly map and the reconstruction (and the spread, and the model's extra
        maps) on the scan's own grid, as ``results`` names them."""
        from .results import check_outputs, export_outputs, write_results

        if self.session is None:
            raise BrainUADError("run the analysis first")
        analysis = self.session.analysis
        files = export_outputs(analysis, folder).files
        check_outputs(files, inputs=[analysis.scan.path], overwrite=overwrite)
        written = write_results(analysis, files, overwrite=overwrite)
        self.status.value = f"Saved {len(written)} files to {folder}"
        return written

    def _ask_and_export_results(self, *_):
        from qtpy.QtWidgets import QFileDialog

        if self.session is None:
            self.status.value = "Run the analysis first."
            return
        folder = QFileDialog.getExistingDirectory(self.native, "Export map and reconstruction to…")
        if folder:
            self._export(lambda: self.export_results(folder))

    def _ask_and_export(self, *_):
        from qtpy.QtWidgets import QFileDialog

        layer = self.mask.value
        if layer is None:
            self.status.value = "Choose a Labels layer to export."
            return
        suggestion = str(self.worklist.export_suggestion() or f"{file_name_of_layer(layer.name)}.nii.gz")
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export mask", suggestion, "NIfTI (*.nii.gz *.nii)"
        )
        if path:
            # The Qt dialog has already asked before replacing an existing file.
            self._export(lambda: self.export_mask(path, overwrite=True))

    def _export(self, write):
        """Run an export the user asked for; a refusal (e.g. files already there, never
        replaced silently) shows its reason, a bug the internal-error line."""
        try:
            write()
            return
        except BrainUADError as error:
            message = str(error)
        except Exception as error:
            message = internal_error_message(error, "the export")
        self.status.value = f"Not saved: {message}"
        napari.utils.notifications.show_error(message)


def _healthy_value(session: ScanSession) -> float | None:
    """The model's healthy threshold for the session's scorer, when it was calibrated."""
    from .thresholds import default_threshold

    healthy = default_threshold(session.model_metadata, session.scorer)
    return None if healthy is None else float(healthy.value)


def file_name_of_layer(name: str) -> str:
    """A file name (without its extension) that keeps a layer's whole name: a layer name is no
    path, so its dots stay ("AX T1 SE 3.0mm annotation"), and only characters no file system
    takes, or that would make folders, become "_"."""
    cleaned = "".join("_" if character in '/\\:*?"<>|' or ord(character) < 32 else character for character in name)
    return cleaned.strip(" .") or "mask"
