"""The worklist in the dock: open a folder, a CSV file or a BIDS dataset of scans, step through
them, and never lose a decision between them.

The list and the session on disk are ``worklist.Worklist``'s (Qt-free); this panel shows them
and keeps them up to date as the user works:

- **one scan at a time**: going to a scan removes the previous scan's layers (its session is
  saved first) and opens the new one, with its brain mask when the list gives one; a scan with
  saved results comes back as the user left it — results, threshold, minimum size, median
  switch, decisions and mask — read from disk in a worker, without running the network;
- **saved as the user works**: every edit, decision, threshold or size change starts a short
  timer, and the session is saved when it runs out (atomically), before going to another scan
  and before the window closes; a save that fails is shown, and going to another scan then asks
  before leaving edits behind;
- **the next scan in the background**: once a scan's results are in view, the next scan that
  was never run is analysed in a worker with the same model and settings (unless its contrast
  picks another model than the scan in view's), and its results are saved, so it opens at once;
  its status says when it is ready or why it failed;
- while the scan in view is being analysed (Run), the list does not move.

Which scan is in view, the session it shows, its typicality and the status line are the dock's
state (``dock_state.DockState``); what the panel needs of the rest of the dock (showing a scan
or a session, the model and settings a run would use) it gets as callbacks, so it never holds
the main widget (which imports this module).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import napari
import numpy as np
from magicgui.widgets import Container, Label, PushButton, Table
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QMessageBox

from ._reader import layer_data
from ._styles import BRAIN, finish_labels, label_style, layer_name, named_after
from ._worker import start_background_run, start_restore
from .errors import BrainUADError, internal_error_message
from .results import ScanResult

if TYPE_CHECKING:
    from .analysis import AnalysisSettings
    from .dock_state import DockState
    from .session import ScanSession
    from .worklist import RestoredScan, Worklist

COLUMNS = ("scan", "status")
VISIBLE_ROWS = 5  # rows of the list shown at once; a longer list scrolls
# How long the user's work rests before the session is saved (a slider drag saves once).
SAVE_DELAY_MS = 1000


@dataclass(frozen=True)
class DockActions:
    """What the worklist asks of the rest of the dock, and nothing more."""

    choose_scan: Callable[[Any], None]  # this scan layer is the dock's scan now
    choose_brain_mask: Callable[[Any], None]  # this Labels layer (or None) is the dock's brain mask now
    # (scan layer, session, annotation on the scan's grid or None, then=called once it is all shown)
    show_session: Callable[..., None]
    finish_showing: Callable[[], None]  # results being shown are shown now, before the scan changes
    clear_results: Callable[[], None]  # no results in the dock: another scan is in view
    keep_saved_annotation: Callable[[Any, np.ndarray], None]  # (scan layer, the user's saved mask)
    model_source: Callable[[], str | Path | None]  # the model a Run would use
    model_path: Callable[[], Path | None]  # its local file, when it is here
    model_source_for: Callable[..., str | Path | None]  # (scan path, *names): the model it would run with
    analysis_settings: Callable[[], AnalysisSettings]  # the dock's settings (raises when they clash)


class WorklistPanel(Container):
    def __init__(self, viewer: napari.viewer.Viewer, state: DockState, actions: DockActions):
        super().__init__(labels=False)
        self._state = state
        self._dock = actions
        self._viewer = viewer
        self.open_folder_button = PushButton(text="Open folder…",
                                             tooltip="a folder of NIfTI scans or DICOM series folders, or a BIDS dataset")
        self.open_csv_button = PushButton(text="Open CSV…", tooltip="a CSV file with a 'scan' column "
                                          "(and optionally 'id', 'brain_mask', 'lesion_mask')")
        self.title = Label(value="Worklist: none (one scan at a time)")
        self.table = Table(value={"data": [], "index": [], "columns": list(COLUMNS)}, visible=False)
        self.previous_button = PushButton(text="◀ Previous scan", visible=False)
        self.next_button = PushButton(text="Next scan ▶", visible=False)
        opening = Container(widgets=[self.open_folder_button, self.open_csv_button], layout="horizontal", labels=False)
        stepping = Container(widgets=[self.previous_button, self.next_button], layout="horizontal", labels=False)
        for row in (opening, stepping):
            row.margins = (0, 0, 0, 0)
        self.extend([opening, self.title, self.table, stepping])
        self.worklist: Worklist | None = None
        self._restores = 0  # restores in flight, read or being shown (the user may move on while one reads)
        self._background = None
        self._background_id: str | None = None
        self._background_cancel = threading.Event()
        self._closing = False  # the window is closing: no new work starts
        self._save_timer = QTimer(self.native)  # dies with the panel, never fires after it
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(SAVE_DELAY_MS)
        self._save_timer.timeout.connect(self.save_now)
        self.open_folder_button.changed.connect(self._ask_folder)
        self.open_csv_button.changed.connect(self._ask_csv)
        self.previous_button.changed.connect(lambda: self.step(-1))
        self.next_button.changed.connect(lambda: self.step(+1))
        self.table.native.cellDoubleClicked.connect(lambda row, column: self._go_to_row(row))
        state.on_edit.append(self.schedule_save)

    @property
    def current(self) -> str | None:
        """The id of the scan in view (the dock's state holds it)."""
        return self._state.entry

    # ------------------------------------------------------------------ opening a list

    def open(self, source: str | Path, *, folder: str | Path | None = None) -> Worklist:
        """Open the worklist of ``source`` (its session folder: ``folder`` or the default) and go
        to the scan last looked at, or the first."""
        from .worklist import Worklist

        self._dock.finish_showing()
        if not self.save_now() and not _ask_to_leave_unsaved(self.native, self.current,
                                                              "open another worklist"):
            return self.worklist
        worklist = Worklist.open(source, folder=folder)
        self._background_cancel.set()  # the background run stops soon
        if self.current is not None:  # the previous list's scan in view: saved above, so its layers go
            _remove_layers(self._viewer, self.current)
            self._dock.clear_results()
        self.worklist = worklist
        self._state.open_entry(None)
        for widget in (self.table, self.previous_button, self.next_button):
            widget.visible = True
        self.refresh_table()
        self.go_to(worklist.current or worklist.entries[0].id)
        return worklist

    def _ask_folder(self, *_):
        from qtpy.QtWidgets import QFileDialog

        self._open_asked(QFileDialog.getExistingDirectory(self.native, "Open a folder of scans or a BIDS dataset"))

    def _ask_csv(self, *_):
        from qtpy.QtWidgets import QFileDialog

        self._open_asked(QFileDialog.getOpenFileName(self.native, "Open a CSV list of scans", "", "CSV (*.csv)")[0])

    def _open_asked(self, source: str) -> None:
        if source:  # else the dialog was cancelled
            self._guarded(lambda: self.open(source), "opening the worklist")

    def refresh_table(self) -> None:
        if self.worklist is None:
            return
        entries = self.worklist.entries
        self.table.value = {"data": [[e.id, self.worklist.status(e.id)] for e in entries],
                            "index": [str(i + 1) for i in range(len(entries))], "columns": list(COLUMNS)}
        self.title.value = _title(self.worklist)
        self.title.tooltip = f"the session (statuses, results, your masks) is saved in {self.worklist.folder}"
        _fit_table_height(self.table.native, len(entries))
        if self.current is not None:
            self.table.native.selectRow(self.worklist.index(self.current))

    # ------------------------------------------------------------------ moving between scans

    def step(self, direction: int) -> None:
        if self.worklist is None:
            return
        entries = self.worklist.entries
        index = 0 if self.current is None else self.worklist.index(self.current)
        self.go_to(entries[(index + direction) % len(entries)].id)

    def _go_to_row(self, row: int) -> None:
        if self.worklist is not None and 0 <= row < len(self.worklist.entries):
            self.go_to(self.worklist.entries[row].id)

    def go_to(self, entry_id: str) -> None:
        """Show scan ``entry_id``: the one in view is saved and its layers removed; the new one
        opens, with its saved session when it has one."""
        if self.worklist is None or entry_id == self.current:
            return
        self._dock.finish_showing()  # a restore being shown completes on the scan it belongs to
        if self._state.analysing:
            self._state.status = "The scan in view is being analysed: wait for it, or Cancel, to move on."
            return
        if not self.save_now() and not _ask_to_leave_unsaved(self.native, self.current, "go to another scan"):
            return
        if self.current is not None:
            _remove_layers(self._viewer, self.current)
        self._dock.clear_results()
        entry = self.worklist.entry(entry_id)
        self._state.open_entry(entry_id)
        try:
            scan_layer = self._open_scan(entry)
        except BrainUADError as error:
            self._state.status = f"{entry_id}: {error}"
            self.refresh_table()
            return
        self.worklist.set_current(entry_id)
        self.refresh_table()
        if self.worklist.has_results(entry_id):
            self._state.status = f"{entry_id}: restoring its saved session…"
            self._start_restore(entry_id, scan_layer)
        elif self._background_id == entry_id:
            self._state.status = f"{entry_id}: being analysed in the background; it shows when ready."
        else:
            error = self.worklist.records[entry_id].error
            self._state.status = f"{entry_id}: " + (f"failed before: {error}" if error else "not run yet; press Run.")

    def _open_scan(self, entry):
        """The scan's layer (named after its id) and its brain mask from the list, if any."""
        data, kwargs, _ = layer_data(str(entry.scan), name=entry.id, labels=False)
        scan_layer = self._viewer.add_image(data, **kwargs)
        self._state.scan_layer_id = scan_layer.unique_id
        self._dock.choose_scan(scan_layer)
        self._dock.choose_brain_mask(_add_brain_layer(self._viewer, entry))
        self._viewer.layers.selection.active = scan_layer
        return scan_layer

    def _start_restore(self, entry_id: str, scan_layer) -> None:
        """Read the scan's saved session in a worker; it shows if the user is still on the scan."""
        self._restores += 1
        start_restore(self.worklist, entry_id, done=lambda restored: self._restored(entry_id, scan_layer, restored),
                      failed=lambda message: self._restore_failed(entry_id, scan_layer, message),
                      finished=self._restore_finished)

    def _restored(self, entry_id: str, scan_layer, restored: RestoredScan | None) -> None:
        if entry_id != self.current or restored is None:
            return  # the user moved on while it was read
        self._restores += 1  # still restoring until it is all shown (a layer per turn of the event loop)

        def shown() -> None:
            self._restores -= 1
            self._state.session_kept = True
            self._state.mark_exported(self._state.annotation.unique_id)  # as saved, nothing new
            session = restored.session  # the findings as the user's review decided them, as after a run
            summary = ScanResult.of(session.analysis, session.model_metadata).summary_line(len(self._state.findings))
            self._state.status = (f"{entry_id}: restored as you left it ({self.worklist.status(entry_id)}): "
                                  f"{summary}; the network did not run.")

        self._dock.show_session(scan_layer, restored.session, restored.annotation, then=shown)
        self._start_background_next()

    def _restore_failed(self, entry_id: str, scan_layer, message: str) -> None:
        if entry_id != self.current:
            return
        saved = self.worklist.saved_annotation(entry_id, scan_layer.metadata["nifti"].shape)
        if saved is not None:  # the results are stale, the user's mask is not: the re-run keeps it
            self._dock.keep_saved_annotation(scan_layer, saved)
        kept = " Your saved mask is shown and kept." if saved is not None else ""
        self._state.status = f"{entry_id}: the saved results cannot be used ({message}). Press Run.{kept}"
        napari.utils.notifications.show_warning(message)

    def _restore_finished(self) -> None:
        self._restores -= 1

    @property
    def busy(self) -> bool:
        """Whether a saved scan is being read back or the next scan analysed in the background."""
        return self._restores > 0 or self._background is not None

    # ------------------------------------------------------------------ saving as the user works

    def run_finished(self, scan_layer, session: ScanSession) -> None:
        """A Run of the scan in view ended: its results are saved, then the next scan starts in
        the background."""
        if self.worklist is None or not self._state.is_entry_layer(scan_layer):
            return  # a scan that is not the worklist's
        from .downloads import file_sha256

        def save():
            self.worklist.save_results(self.current, session.analysis, model=str(self._dock.model_source()),
                                       model_sha256=file_sha256(self._dock.model_path()),
                                       model_metadata=dict(session.model_metadata))

        if self._guarded(save, "saving the results"):
            self._state.session_kept = True
            self.save_now()
            self._start_background_next()
        self.refresh_table()

    def schedule_save(self) -> None:
        """The user changed something: save once their work rests."""
        if self.worklist is not None and self._state.session_kept:
            self._save_timer.start()

    def save_now(self) -> bool:
        """Save the session of the scan in view now. Returns False only when saving failed."""
        self._save_timer.stop()
        state = self._state
        if self.worklist is None or not state.session_kept or state.session is None or state.annotation is None:
            return True
        geometry = state.session.analysis.scan.geometry
        annotation = geometry.to_source(np.asarray(state.annotation.data))
        entry_id, session = self.current, state.session
        if not self._guarded(lambda: self.worklist.save_review(entry_id, session, annotation), "saving the session"):
            return False
        state.mark_exported(state.annotation.unique_id)
        self.refresh_table()
        return True

    def exported(self, layer) -> None:
        """``layer`` was exported: when it is the scan's mask, the scan's status says so."""
        annotation = self._state.annotation
        if self.worklist is None or not self._state.session_kept or annotation is None \
                or layer.unique_id != annotation.unique_id:
            return
        if self.save_now():
            self._guarded(lambda: self.worklist.mark_exported(self.current), "saving the session")
            self.refresh_table()

    def export_suggestion(self) -> Path | None:
        """Where a worklist scan's mask goes by default: beside its session."""
        if self.worklist is None or self.current is None:
            return None
        return self.worklist.folder / f"{self.worklist.scan_folder(self.current).name}_annotation.nii.gz"

    def closing(self) -> None:
        """The window closes: stop the background run, and start no new work."""
        self._closing = True
        self._background_cancel.set()  # the background run stops soon

    # ------------------------------------------------------------------ the next scan, meanwhile

    def _start_background_next(self) -> None:
        if self.worklist is None or self._background is not None or self._closing:
            return
        entry = self.worklist.next_to_run(self.current)
        source = self._dock.model_source()
        if entry is None or source is None:
            return
        if self._dock.model_source_for(entry.scan, entry.id) != source:
            return  # its contrast picks another model: it runs with that model's defaults when the user gets there
        try:
            settings = self._dock.analysis_settings()
        except BrainUADError:
            return  # the dock's settings do not go together; the user sees why at their next Run
        self._background_cancel = threading.Event()
        self._background_id = entry.id
        self._background = start_background_run(
            self.worklist, entry.id, source, settings, cancel=self._background_cancel,
            done=lambda finished: self._background_done(entry.id, finished),
            failed=lambda message: self._background_failed(entry.id, message),
            finished=self._background_finished)
        self.refresh_table()

    def _background_done(self, entry_id: str, finished: bool) -> None:
        self.refresh_table()
        if finished and entry_id == self.current and not self._state.session_kept and not self._restores \
                and not self._closing:
            layer = next((l for l in self._viewer.layers if self._state.is_entry_layer(l)), None)
            if layer is not None:
                self._start_restore(entry_id, layer)

    def _background_failed(self, entry_id: str, message: str) -> None:
        self.refresh_table()
        if entry_id == self.current:
            self._state.status = f"{entry_id}: the background analysis failed: {message}"

    def _background_finished(self) -> None:
        self._background, self._background_id = None, None

    def _guarded(self, work, where: str) -> bool:
        """Run ``work``; a failure is shown (a bug as the internal-error line) and False returned."""
        try:
            work()
            return True
        except (BrainUADError, OSError) as error:
            message = str(error)
        except Exception as error:
            message = internal_error_message(error, where)
        self._state.status = f"Error: {message}"
        napari.utils.notifications.show_error(message)
        return False


def _title(worklist: Worklist) -> str:
    """The list's size and how many scans are in each status."""
    counts = {}
    for entry in worklist.entries:
        status = worklist.status(entry.id)
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"Worklist: {len(worklist.entries)} scans ({summary}); double-click a row to open it"


def _fit_table_height(table, rows: int) -> None:
    """As tall as its rows, up to a few: a short list leaves its room to the review below;
    a long one scrolls."""
    shown = min(max(rows, 1), VISIBLE_ROWS)
    table.setMaximumHeight(table.horizontalHeader().height() + shown * table.verticalHeader().defaultSectionSize()
                           + 2 * table.frameWidth())


def _ask_to_leave_unsaved(parent, entry_id: str | None, action: str) -> bool:
    answer = QMessageBox.question(
        parent, "Session not saved",
        f"The edits on {entry_id} could not be saved (see the status line). {action.capitalize()} "
        "anyway and lose them?",
        QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
        QMessageBox.StandardButton.Cancel,
    )
    return answer == QMessageBox.StandardButton.Discard


def _add_brain_layer(viewer, entry):
    """The entry's brain mask from the list as an outlined Labels layer (None when it gives none)."""
    if entry.brain_mask is None:
        return None
    data, kwargs, _ = layer_data(str(entry.brain_mask), name=layer_name(BRAIN, entry.id), labels=True)
    return finish_labels(viewer.add_labels(data, **{**kwargs, **label_style(BRAIN)}), BRAIN)


def _remove_layers(viewer, entry_id: str) -> None:
    """The scan's own layers (its scan and every layer named after it); their work is saved.
    Removed as one batch: napari then updates its scene and collects the freed GPU objects once
    (a full garbage collection, a third of a second with torch loaded) instead of once a layer."""
    with viewer.layers.batched_update():
        for layer in list(viewer.layers):
            if layer.name == entry_id or named_after(layer.name, entry_id):
                viewer.layers.remove(layer)
