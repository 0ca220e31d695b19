"""The dock's exports: the user's mask (a Labels layer on its scan's original grid, with the
scan's affine) and a run's result files (as ``results`` names and writes them), with their
dialogs. A refusal (files already there, never replaced silently) shows its reason in the
status line; a bug the internal-error line.

Which layer Export writes starts as the scan's annotation layer — the user's own mask — and
never, unless the user chooses it, a reference or brain mask (exporting the expert's mask as the
user's, before any run, was one click away).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import napari
from magicgui.widgets import PushButton, create_widget

from ._styles import BRAIN, REFERENCE
from ._writer import write_layer
from .errors import BrainUADError, internal_error_message

if TYPE_CHECKING:
    from .dock_state import DockState


class Exports:
    """The mask choice and the two export buttons (not a widget: the dock lays them out)."""

    def __init__(self, state: DockState, parent: Callable[[], object], *,
                 exported: Callable[[object], None], suggestion: Callable[[], Path | None]):
        self._state = state
        self._parent = parent  # the dock's native widget: the dialogs' parent
        self._exported = exported  # a mask was written (a worklist marks its scan exported)
        self._suggestion = suggestion  # where a mask goes by default (a worklist's session folder)
        self.mask = create_widget(annotation=napari.layers.Labels, label="Mask", options={"nullable": True})
        self.export_button = PushButton(text="Export mask…")
        self.export_results_button = PushButton(text="Export map and reconstruction…")
        self._chosen_by_user = False  # else Export writes the scan's annotation layer, or nothing
        self.export_button.changed.connect(self._ask_and_export)
        self.mask.changed.connect(self._mask_chosen)
        self.export_results_button.changed.connect(self._ask_and_export_results)

    @property
    def widgets(self) -> list:
        return [self.mask, self.export_button, self.export_results_button]

    def _mask_chosen(self, *_):
        self._chosen_by_user = self.mask.value is not None

    def follow_layers(self) -> None:
        """Layers came or went: unless the user chose the mask, it stays the user's own layer."""
        if not self._chosen_by_user and not _is_users_mask(self.mask.value):
            with self.mask.changed.blocked():
                try:
                    self.mask.value = self._state.annotation  # None before any run
                except ValueError:  # the user deleted their annotation layer
                    self.mask.value = None

    def choose_annotation(self) -> None:
        """New results: what an export writes is the user's mask of them."""
        self.mask.reset_choices()
        with self.mask.changed.blocked():
            self.mask.value = self._state.annotation
        self._chosen_by_user = False

    def export_mask(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the chosen Labels layer on its scan's original grid, with the scan's affine."""
        layer = self.mask.value
        if layer is None:
            raise BrainUADError("choose a Labels layer to export")
        meta = {"name": layer.name, "metadata": layer.metadata}
        written = write_layer(str(path), layer.data, meta, kind="labels", overwrite=overwrite)
        self._state.mark_exported(layer.unique_id)
        self._exported(layer)
        self._state.status = f"Saved {written}"
        return written

    def export_results(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write the anomaly map and the reconstruction (and the spread, and the model's extra
        maps) on the scan's own grid, as ``results`` names them."""
        from .results import check_outputs, export_outputs, write_results

        if self._state.session is None:
            raise BrainUADError("run the analysis first")
        analysis = self._state.session.analysis
        files = export_outputs(analysis, folder).files
        check_outputs(files, inputs=[analysis.scan.path], overwrite=overwrite)
        written = write_results(analysis, files, overwrite=overwrite)
        self._state.status = f"Saved {len(written)} files to {folder}"
        return written

    def _ask_and_export_results(self, *_):
        from qtpy.QtWidgets import QFileDialog

        if self._state.session is None:
            self._state.status = "Run the analysis first."
            return
        folder = QFileDialog.getExistingDirectory(self._parent(), "Export map and reconstruction to…")
        if folder:
            self._export(lambda: self.export_results(folder))

    def _ask_and_export(self, *_):
        from qtpy.QtWidgets import QFileDialog

        layer = self.mask.value
        if layer is None:
            self._state.status = "Choose a Labels layer to export."
            return
        suggestion = str(self._suggestion() or f"{file_name_of_layer(layer.name)}.nii.gz")
        path, _ = QFileDialog.getSaveFileName(self._parent(), "Export mask", suggestion, "NIfTI (*.nii.gz *.nii)")
        if path:
            # The Qt dialog has already asked before replacing an existing file.
            self._export(lambda: self.export_mask(path, overwrite=True))

    def _export(self, write):
        """Run an export the user asked for; a refusal shows its reason, a bug the internal-error line."""
        try:
            write()
            return
        except BrainUADError as error:
            message = str(error)
        except Exception as error:
            message = internal_error_message(error, "the export")
        self._state.status = f"Not saved: {message}"
        napari.utils.notifications.show_error(message)


def _is_users_mask(layer) -> bool:
    """Whether a Labels layer may be what Export writes without the user choosing it: not a
    reference or brain mask (opened from disk, or a brain the dock found: ``metadata["role"]``)."""
    return layer is not None and layer.metadata.get("role") not in (REFERENCE, BRAIN)


def file_name_of_layer(name: str) -> str:
    """A file name (without its extension) that keeps a layer's whole name: a layer name is no
    path, so its dots stay ("AX T1 SE 3.0mm annotation"), and only characters no file system
    takes, or that would make folders, become "_"."""
    cleaned = "".join("_" if character in '/\\:*?"<>|' or ord(character) < 32 else character for character in name)
    return cleaned.strip(" .") or "mask"
