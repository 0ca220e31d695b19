"""The main dock widget. For now: what the scan is, and exporting a mask onto the scan's grid.

Anomaly detection (model, scorer, run, threshold) joins this widget with the model and scoring
work; the widget stays thin and calls the Qt-free core for everything.
"""

from __future__ import annotations

from pathlib import Path

import napari
from magicgui.widgets import Container, Label, PushButton, create_widget

from ._writer import write_layer
from .io import nifti_stem


class BrainUADWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.scan = create_widget(annotation=napari.layers.Image, label="Scan")
        self.scan_info = Label(value="")
        self.mask = create_widget(annotation=napari.layers.Labels, label="Mask")
        self.export_button = PushButton(text="Export mask…")
        self.status = Label(value="")
        self.extend([self.scan, self.scan_info, self.mask, self.export_button, self.status])
        self.scan.changed.connect(self._show_scan_info)
        self.export_button.changed.connect(self._ask_and_export)
        self._show_scan_info()

    def reset_choices(self, *_):  # napari calls this when layers are added or removed
        super().reset_choices()
        self._show_scan_info()

    def _show_scan_info(self, *_):
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

    def export_mask(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the chosen Labels layer on its scan's original grid, with the scan's affine."""
        layer = self.mask.value
        if layer is None:
            raise ValueError("choose a Labels layer to export")
        meta = {"name": layer.name, "metadata": layer.metadata}
        written = write_layer(str(path), layer.data, meta, kind="labels", overwrite=overwrite)
        self.status.value = f"Saved {written}"
        return written

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
