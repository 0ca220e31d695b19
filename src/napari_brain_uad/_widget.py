"""The main dock widget: scan, model, scorer, Run/Cancel, results, threshold, export.

The widget holds no science: ``analysis.analyse_scan`` (the Qt-free core) does the work in a
napari ``thread_worker``; the widget turns its progress callback into a progress bar, its
cancel callback into the Cancel button, and its native-grid results into layers on the scan's
own display grid. A threshold change only re-thresholds the cached filtered map.
"""

from __future__ import annotations

import threading
from pathlib import Path

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
    Table,
    create_widget,
)
from qtpy.QtCore import QObject, QTimer, Signal

from ._writer import write_layer
from .io import NiftiVolume, nifti_stem
from .model_registry import (
    ModelUnavailable,
    default_model_name,
    default_threshold_name,
    local_model_file,
    model_names,
    resolve_model,
    stored_thresholds,
)
from .scoring import SCORERS

FILE_CHOICE = "checkpoint file…"
NO_PRESET = "—"


_FINDING_COLUMNS = ("#", "volume (mL)", "mean score", "max score")
_MODALITY_WORDS = {"FLAIR": ("flair",), "T1c": ("t1c", "t1ce", "t1post", "t1gd"), "T2": ("t2",), "T1": ("t1",)}


def guess_modality(*names: str) -> str | None:
    """The contrast a file or layer name suggests (``T1``, ``T1c``, ``T2``, ``FLAIR``), or None."""
    import re

    text = " ".join(names).lower()
    for modality, words in _MODALITY_WORDS.items():  # T1c before T1: the longer word first
        if any(re.search(rf"(^|[^a-z0-9]){word}([^a-z0-9]|$)", text) for word in words):
            return modality
    return None


class _ProgressRelay(QObject):
    """Carries progress from the worker thread to the GUI thread (Qt queues cross-thread signals)."""

    changed = Signal(float, str)


class BrainUADWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.scan = create_widget(annotation=napari.layers.Image, label="Scan")
        self.scan_info = Label(value="")
        self.brain_mask = create_widget(annotation=napari.layers.Labels, label="Brain mask",
                                        options={"nullable": True})
        self.model_choice = ComboBox(label="Model", choices=[*model_names(), FILE_CHOICE], value=default_model_name())
        self.model_file = FileEdit(label="Checkpoint", filter="*.safetensors", value="", visible=False)
        self.model_info = Label(value="")
        self.scorer = ComboBox(label="Scorer", choices=list(SCORERS), value="ssim-ens")
        self.samples = SpinBox(label="Samples (N)", min=1, max=50, value=1)
        self.noise_levels = ComboBox(label="Noise level", choices=["model's t_test", "250, 500, 750"],
                                     value="model's t_test")
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=1000, value=0)
        self.threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, value=0.5, enabled=False)
        self.threshold_preset = ComboBox(label="Preset", choices=[NO_PRESET], value=NO_PRESET,
                                         tooltip="thresholds calibrated with the model for this scorer")
        self.min_size_ml = FloatSpinBox(label="Min lesion (mL)", min=0.0, max=100.0, step=0.01, value=0.056)
        self.median = CheckBox(label="Median filter", value=True,
                               tooltip="5×5×5 median of the map (post-processing only: the model does not run again)")
        self.findings = Table(label="Findings", value={"data": [], "index": [], "columns": list(_FINDING_COLUMNS)})
        self.mask = create_widget(annotation=napari.layers.Labels, label="Mask")
        self.export_button = PushButton(text="Export mask…")
        self.export_results_button = PushButton(text="Export map and reconstruction…")
        self.status = Label(value="")
        self.extend([
            self.scan, self.scan_info, self.brain_mask, self.model_choice, self.model_file, self.model_info,
            self.scorer, self.samples, self.noise_levels, self.device, self.run_button, self.cancel_button,
            self.progress, self.threshold, self.threshold_preset, self.min_size_ml, self.median, self.findings, self.mask, self.export_button,
            self.export_results_button, self.status,
        ])
        self.analysis = None  # the latest ScanAnalysis
        self._results_layer = None
        self._map_layer = None
        self._worker = None
        self._median_worker = None
        self._model_metadata: dict = {}
        self._resolved: dict[str, Path] = {}  # registry name -> verified local file
        self._cancel = threading.Event()
        self._relay = _ProgressRelay()
        self._relay.changed.connect(self._show_progress)
        self.scan.changed.connect(self._show_scan_info)
        self.model_choice.changed.connect(self._model_changed)
        self.model_file.changed.connect(self._file_chosen)
        self.scorer.changed.connect(self._show_presets)
        self.threshold_preset.changed.connect(self._apply_preset)
        self.median.changed.connect(self._median_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.threshold.changed.connect(self._update_mask)
        self.min_size_ml.changed.connect(self._update_mask)
        self.export_button.changed.connect(self._ask_and_export)
        self.export_results_button.changed.connect(self._ask_and_export_results)
        self.findings.native.cellClicked.connect(lambda row, column: self.go_to_finding(row))
        # The findings table (components, volumes, scores) costs more than the mask itself, so it
        # follows the slider once it rests for a moment rather than at every step.
        self._findings_timer = QTimer(self.native)  # dies with the widget, never fires after it
        self._findings_timer.setSingleShot(True)
        self._findings_timer.setInterval(250)
        self._findings_timer.timeout.connect(self._update_findings)
        self._finding_rows: list[dict] = []
        self._show_scan_info()
        self._model_changed()

    def reset_choices(self, *_):  # napari calls this when layers are added or removed
        preset = self.threshold_preset.value
        super().reset_choices()  # also puts every ComboBox back to its initial choices
        self._show_scan_info()
        self._show_presets()
        if preset in self.threshold_preset.choices:
            with self.threshold_preset.changed.blocked():
                self.threshold_preset.value = preset

    # ------------------------------------------------------------------ what the inputs are

    def _show_scan_info(self, *_):
        if hasattr(self, "model_info"):
            self._show_model_info()
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

    def _model_source(self) -> str | Path | None:
        """What to resolve at Run: a registry name, or the chosen checkpoint file (None: none yet)."""
        if self.model_choice.value == FILE_CHOICE:
            return self._chosen_file()
        return self.model_choice.value

    def _model_path(self) -> Path | None:
        """The model's local file when it is already here (bundled, cached, or chosen), else None."""
        source = self._model_source()
        if source is None or isinstance(source, Path):
            return source
        if source not in self._resolved:
            local = local_model_file(source)  # a damaged bundled file raises
            if local is None:
                return None
            self._resolved[source] = local
        return self._resolved[source]

    def _model_changed(self, *_):
        """A new model: its card, its default scorer, and its calibrated thresholds."""
        self.model_file.visible = self.model_choice.value == FILE_CHOICE
        self._show_model_info()
        default_scorer = self._model_metadata.get("default_scorer")
        if default_scorer in SCORERS and self.scorer.value != default_scorer:
            self.scorer.value = default_scorer  # its presets follow
            if SCORERS[default_scorer].needs == "samples" and self.samples.value < 2:
                self.samples.value = 10
        else:
            self._show_presets()

    def _show_model_info(self, *_):
        from .checkpoint import CheckpointError, read_metadata

        self._model_metadata = {}
        source = self._model_source()
        if source is None:
            self.model_info.value = "Choose a model checkpoint (.safetensors)."
            return
        try:
            path = self._model_path()
            if path is None:
                self.model_info.value = f"{source}: downloaded (hash-checked) when you press Run."
                return
            metadata = read_metadata(path)
        except (CheckpointError, ModelUnavailable) as error:
            self.model_info.value = f"Not usable: {error}"
            return
        self._model_metadata = metadata
        space = metadata.get("model_space", {})
        data = metadata.get("training_data", {})
        self.model_info.value = (
            f"{metadata['kind']}, {space.get('modality', '?')}, {space.get('spacing_mm', '?')} mm, "
            f"{' × '.join(str(n) for n in space.get('in_plane', []))}"
            f"{', N4 bias correction' if space.get('bias_correction') == 'n4' else ''}\n"
            f"trained on: {data.get('description') or 'not described'}"
        ) + self._modality_warning(space.get("modality"))

    def _show_presets(self, *_):
        """The model's thresholds that were calibrated for the chosen scorer."""
        names = list(stored_thresholds(self._model_metadata, self.scorer.value))
        with self.threshold_preset.changed.blocked():
            self.threshold_preset.choices = [NO_PRESET, *names]
            self.threshold_preset.value = NO_PRESET

    def _apply_preset(self, *_):
        name = self.threshold_preset.value
        value = stored_thresholds(self._model_metadata, self.scorer.value).get(name)
        if value is None or not self.threshold.enabled:
            return
        low, high = self.threshold.range
        if not low <= value <= high:
            self.status.value = f"{name} = {value:.4g} lies outside this map's scores ({low:.4g} to {high:.4g})"
        self.threshold.value = min(max(value, low), high)

    def _modality_warning(self, model_modality: str | None) -> str:
        """A warning line when the scan's name suggests another contrast than the model's."""
        layer = self.scan.value
        guess = guess_modality(layer.name if layer is not None else "",
                               layer.metadata.get("nifti").source if layer is not None and "nifti" in layer.metadata else "")
        if model_modality and guess and guess.upper() != model_modality.upper():
            return f"\n⚠ the scan looks like {guess} but the model was trained on {model_modality}"
        return ""

    # ------------------------------------------------------------------ running

    def _inputs(self):
        """The scan (and brain mask) on the source grid, and the model; errors say what is missing."""
        layer = self.scan.value
        if layer is None:
            raise ValueError("open a scan first (File > Open, or File > Open Sample)")
        geometry = layer.metadata.get("nifti")
        if geometry is None or layer.data.ndim != 3:
            raise ValueError(f"{layer.name}: a 3D scan opened from NIfTI is needed (its geometry is unknown)")
        scan = NiftiVolume(data=np.asarray(geometry.to_source(np.asarray(layer.data)), dtype=np.float32),
                           geometry=geometry)
        brain = None
        if self.brain_mask.value is not None:
            brain = geometry.to_source(np.asarray(self.brain_mask.value.data)) > 0
        source = self._model_source()
        if source is None:
            raise ValueError("choose a model checkpoint first")
        return layer, scan, brain, source

    def _settings(self):
        from .analysis import AnalysisSettings

        levels = None if self.noise_levels.value == "model's t_test" else (250, 500, 750)
        return AnalysisSettings(scorer=self.scorer.value, samples=self.samples.value, noise_levels=levels,
                                device=self.device.value, median=self.median.value)

    def run(self, *_):
        """Start the analysis in a worker thread; the viewer stays responsive."""
        from napari.qt.threading import create_worker

        from .analysis import analyse_scan
        from .models import load_model
        from .reconstruct import Cancelled

        try:
            layer, scan, brain, source = self._inputs()
            settings = self._settings()
        except Exception as error:
            self._fail(str(error))
            return
        self._cancel.clear()
        relay = self._relay

        def work():
            # Expected failures (bad scan, unusable model) come back as a message for the
            # status line; anything else is a bug and reaches napari's error handling.
            try:
                relay.changed.emit(0.0, "model")
                model, metadata = load_model(resolve_model(source))
                analysis = analyse_scan(scan, model, brain_mask=brain, settings=settings,
                                        progress=lambda fraction, stage: relay.changed.emit(fraction, stage),
                                        cancelled=self._cancel.is_set)
            except Cancelled:
                return ("cancelled",)  # a user's choice, not an error
            except ValueError as error:  # ScanError and CheckpointError are ValueErrors
                return ("failed", str(error))
            return ("done", analysis, metadata)

        self._worker = create_worker(work, _progress={"desc": "Brain UAD"})
        self._worker.returned.connect(lambda outcome: self._outcome(layer, outcome))
        self._worker.errored.connect(self._worker_failed)
        self._worker.finished.connect(self._finished)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "Running…"
        self._worker.start()

    def cancel(self, *_):
        self._cancel.set()
        self.status.value = "Cancelling…"

    def _show_progress(self, fraction: float, stage: str):
        self.progress.value = int(round(1000 * fraction))
        self.progress.label = stage

    def _outcome(self, scan_layer, outcome):
        if outcome[0] == "done":
            self._show_results(scan_layer, *outcome[1:])
        elif outcome[0] == "cancelled":
            self.status.value = "Cancelled; nothing was added."
            self.progress.value = 0
        else:
            self._fail(outcome[1])

    def _worker_failed(self, error: Exception):
        self._fail(str(error))

    def _fail(self, message: str):
        self.status.value = f"Error: {message}"
        napari.utils.notifications.show_error(message)

    def _finished(self):
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self._worker = None

    # ------------------------------------------------------------------ results

    def _show_results(self, scan_layer, analysis, metadata):
        geometry = scan_layer.metadata["nifti"]
        placement = {"scale": scan_layer.scale, "translate": scan_layer.translate,
                     "metadata": {"nifti": geometry, "model": metadata.get("kind")}}
        name = scan_layer.name
        self.analysis = analysis
        self._replace(f"{name} reconstruction", "image", geometry.to_display(analysis.reconstruction),
                      colormap="gray", contrast_limits=scan_layer.contrast_limits, visible=False, **placement)
        low, high = analysis.filtered.score_range()
        high = high if high > low else low + 1e-6
        self._map_layer = self._replace(
            f"{name} anomaly map", "image", geometry.to_display(analysis.anomaly_map), colormap="inferno",
            blending="additive", opacity=0.6, contrast_limits=(low, high),
            **{**placement, "metadata": {**placement["metadata"], "analysis": analysis}},
        )
        if analysis.spread is not None:
            self._replace(f"{name} spread", "image", geometry.to_display(analysis.spread), colormap="viridis",
                          blending="additive", visible=False, **placement)
        # The model's healthy-percentile threshold for this scorer when it has one and this run
        # used the scorer it was calibrated with; else the middle of the map's range.
        preset = default_threshold_name(metadata, analysis.settings.scorer)
        start = stored_thresholds(metadata, analysis.settings.scorer).get(preset) if preset else None
        if start is None or not low <= start <= high:
            preset, start = None, low + 0.5 * (high - low)
        with self.threshold.changed.blocked():
            self.threshold.range = (low, high)
            self.threshold.step = (high - low) / 1000
            self.threshold.value = start
        with self.threshold_preset.changed.blocked():
            # The presets listed are those of the model and scorer now chosen, which the user
            # may have changed while the run went on.
            self.threshold_preset.value = preset if preset in self.threshold_preset.choices else NO_PRESET
        self.threshold.enabled = True
        self._map_layer.metadata["threshold"] = self.threshold.value
        self._results_layer = self._replace(f"{name} anomalies", "labels",
                                            geometry.to_display(analysis.mask_at(self.threshold.value,
                                                                                 self.min_size_ml.value)),
                                            **placement)
        self.mask.reset_choices()
        self.mask.value = self._results_layer
        self._update_findings()
        self.status.value = f"Done: {len(self._finding_rows)} finding(s)."

    def _replace(self, name, kind, data, **kwargs):
        """Add a result layer, or refresh the one of the same name from an earlier run."""
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        add = self._viewer.add_labels if kind == "labels" else self._viewer.add_image
        return add(data, name=name, **kwargs)

    def _update_mask(self, *_):
        """Threshold or minimum size moved: re-threshold the cached filtered map, nothing else."""
        if self.analysis is None or self._results_layer is None or self._results_layer not in self._viewer.layers:
            return
        geometry = self._results_layer.metadata["nifti"]
        self._results_layer.data = geometry.to_display(self.analysis.mask_at(self.threshold.value,
                                                                             self.min_size_ml.value))
        if self._map_layer is not None:
            self._map_layer.metadata["threshold"] = self.threshold.value  # for the Evaluate widget
        self._findings_timer.start()

    def _median_changed(self, *_):
        """Median on/off after a run: redo the post-processing in a worker; the model does not run."""
        from napari.qt.threading import create_worker

        if self.analysis is None or self._median_worker is not None:
            return
        analysis, median = self.analysis, self.median.value
        self.status.value = "Post-processing…"
        self._median_worker = create_worker(lambda: analysis.with_median(median), _progress={"desc": "Median filter"})
        self._median_worker.returned.connect(self._refiltered)
        self._median_worker.errored.connect(self._worker_failed)
        self._median_worker.finished.connect(self._median_finished)
        self._median_worker.start()

    def _refiltered(self, analysis):
        self.analysis = analysis
        if self._map_layer is not None:
            self._map_layer.metadata["analysis"] = analysis
        self._update_mask()
        self._update_findings()
        self.status.value = f"Median filter {'on' if analysis.filtered.median else 'off'}: {len(self._finding_rows)} finding(s)."

    def _median_finished(self):
        self._median_worker = None
        if self.analysis is not None and self.analysis.filtered.median != self.median.value:
            self._median_changed()  # toggled again while the worker ran

    def _update_findings(self):
        if self.analysis is None:
            return
        self._finding_rows = self.analysis.findings(self.threshold.value, self.min_size_ml.value)
        rows = [[row["label"], round(row["volume_ml"], 3), round(row["mean_score"], 4), round(row["max_score"], 4)]
                for row in self._finding_rows]
        self.findings.value = {"data": rows, "index": [str(row[0]) for row in rows], "columns": list(_FINDING_COLUMNS)}

    def go_to_finding(self, row: int):
        """Centre the viewer on a finding: its slice in every dimension, and the camera."""
        if not 0 <= row < len(self._finding_rows) or self.analysis is None:
            return
        geometry = self.analysis.scan.geometry
        world = geometry.source_index_to_world(self._finding_rows[row]["centre_voxel"])
        self._viewer.dims.point = tuple(world)
        self._viewer.camera.center = tuple(world)

    # ------------------------------------------------------------------ export

    def export_mask(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the chosen Labels layer on its scan's original grid, with the scan's affine."""
        layer = self.mask.value
        if layer is None:
            raise ValueError("choose a Labels layer to export")
        meta = {"name": layer.name, "metadata": layer.metadata}
        written = write_layer(str(path), layer.data, meta, kind="labels", overwrite=overwrite)
        self.status.value = f"Saved {written}"
        return written

    def export_results(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write the anomaly map and the reconstruction (and the spread) on the scan's own grid."""
        from .io import save_source_array

        if self.analysis is None:
            raise ValueError("run the analysis first")
        folder = Path(folder)
        stem = nifti_stem(Path(self.analysis.scan.path).name)
        written = []
        for suffix, array in (("anomaly_map", self.analysis.anomaly_map),
                              ("reconstruction", self.analysis.reconstruction),
                              ("spread", self.analysis.spread)):
            if array is not None:
                written.append(save_source_array(array, self.analysis.scan.geometry,
                                                 folder / f"{stem}_{suffix}.nii.gz", kind="image",
                                                 overwrite=overwrite))
        self.status.value = f"Saved {len(written)} files to {folder}"
        return written

    def _ask_and_export_results(self, *_):
        from qtpy.QtWidgets import QFileDialog

        if self.analysis is None:
            self.status.value = "Run the analysis first."
            return
        folder = QFileDialog.getExistingDirectory(self.native, "Export map and reconstruction to…")
        if not folder:
            return
        try:
            self.export_results(folder)
        except Exception as error:  # e.g. files already there: never replaced silently
            self.status.value = f"Not saved: {error}"
            napari.utils.notifications.show_error(str(error))

    def _ask_and_export(self, *_):
        from qtpy.QtWidgets import QFileDialog

        layer = self.mask.value
        if layer is None:
            self.status.value = "Choose a Labels layer to export."
            return
        suggestion = f"{nifti_stem(layer.name)}.nii.gz"
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export mask", suggestion, "NIfTI (*.nii.gz *.nii)"
        )
        if not path:
            return
        try:
            # The Qt dialog has already asked before replacing an existing file.
            self.export_mask(path, overwrite=True)
        except Exception as error:  # shown to the user, not swallowed
            self.status.value = f"Not saved: {error}"
            napari.utils.notifications.show_error(str(error))
