"""Reviewing the findings of a run, and the user's mask that no slider or re-run overwrites.

Two Labels layers per scan, kept apart on purpose:

- **proposal** (orange): what the model still proposes at the current threshold and minimum
  size — its findings, without what the user has accepted, drawn or rejected. The slider, the
  minimum size and the median switch rewrite this layer, and only this one.
- **annotation** (green): the user's mask — the findings they accepted plus their own strokes
  (paint, erase, fill). Nothing but the user writes it: accepting or rejecting a finding is an
  edit of it made through napari's own ``data_setitem``, so Ctrl+Z undoes it like a stroke; a
  threshold change never touches it, so its undo history stays whole; a re-run keeps it as it
  is. It is the mask the export writes.

Why two layers rather than a slider that only changes the voxels the user never touched: the
user can see at any time what is theirs and what is the model's, the export holds exactly what
they accepted or drew, and no hidden bookkeeping of "touched" voxels can go wrong.

Each finding is open, accepted or rejected (``session.ScanSession.review``); the table shows its
status, volume, mean and max score, axial slice and side. Buttons and keys (Shift+N next,
Shift+P previous, Shift+A accept, Shift+R reject) step through them and take the viewer to
each. Edits not yet exported (or, in a worklist, saved with its session) are tracked, and
closing the window with them asks first.

The session, its findings, the annotation layer and the edits not exported are the dock's state
(``dock_state.DockState``), which this review reads and writes: the worklist and the main widget
see the same ones without reaching into the review.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import napari
import numpy as np
from magicgui.widgets import Container, Label, PushButton, Table
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QMessageBox, QStyledItemDelegate

from ._result_layers import add_or_refresh
from ._styles import ANNOTATION, PROPOSAL, UNDER_REVIEW, finish_labels, label_style, layer_name

if TYPE_CHECKING:
    from .dock_state import DockState
    from .session import Finding, ScanSession

COLUMNS = ("#", "status", "mL", "mean", "max", "slice", "side")
KEYS = {"next": "Shift-N", "previous": "Shift-P", "accept": "Shift-A", "reject": "Shift-R"}
# The narrowest field of view (mm) the review zooms to around a finding: enough anatomy around
# even a small lesion to see where it is.
REVIEW_FIELD_MM = 80.0


class FindingsReview(Container):
    """The findings table with its review buttons, and the proposal and annotation layers."""

    def __init__(self, viewer: napari.viewer.Viewer, state: DockState):
        super().__init__(labels=False)
        self._viewer = viewer
        self._state = state
        self.title = Label(value="Findings: run the analysis first")
        self.table = Table(value={"data": [], "index": [], "columns": list(COLUMNS)})
        # Cells show the text as _row formats it: magicgui's own delegate re-reads numbers and
        # writes small ones as 9.900e-02 beside 0.1102.
        self.table.native.setItemDelegate(QStyledItemDelegate(self.table.native))
        self.previous_button = PushButton(text="◀", tooltip=f"previous finding ({KEYS['previous']})")
        self.next_button = PushButton(text="▶", tooltip=f"next finding ({KEYS['next']})")
        self.accept_button = PushButton(text="Accept", tooltip=f"add this finding to your mask ({KEYS['accept']})")
        self.reject_button = PushButton(text="Reject", tooltip=f"not a lesion ({KEYS['reject']})")
        buttons = Container(widgets=[self.previous_button, self.next_button, self.accept_button,
                                     self.reject_button], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.extend([self.title, self.table, buttons])
        self.proposal_layer = None
        self.marker_layer = None  # the finding under review, outlined (made at the first one)
        self._marker_placement = None  # its name, shape and placement until it is made
        self._marked = False  # whether the marker layer holds a finding now
        self.current: int | None = None  # row of the finding in view
        self._watched: set = set()  # annotation layers whose edits are followed
        self._close_guard: _AskBeforeClosing | None = None
        # Called before the window closes (a worklist saves what is pending, so nothing saved is
        # asked about), and once the close is decided (the dock ends its running work while its
        # widgets still live). Edits and decisions are announced by the state (``on_edit``).
        self.before_close: list = []
        self.on_close: list = []
        self.previous_button.changed.connect(lambda: self.step(-1))
        self.next_button.changed.connect(lambda: self.step(+1))
        self.accept_button.changed.connect(self.accept_current)
        self.reject_button.changed.connect(self.reject_current)
        self.table.native.cellClicked.connect(lambda row, column: self.go_to(row))
        for action, key in KEYS.items():
            viewer.bind_key(key, self._key_handler(action), overwrite=True)

    # The session, its findings and the user's layer are the dock's, kept in its state.

    @property
    def session(self) -> ScanSession | None:
        return self._state.session

    @session.setter
    def session(self, session: ScanSession | None) -> None:
        self._state.session = session

    @property
    def annotation_layer(self):
        return self._state.annotation

    @property
    def findings(self) -> list[Finding]:
        return self._state.findings

    def _key_handler(self, action: str):
        handlers = {"next": lambda: self.step(+1), "previous": lambda: self.step(-1),
                    "accept": self.accept_current, "reject": self.reject_current}

        def handle(viewer):
            handlers[action]()

        return handle

    # ------------------------------------------------------------------ a run's results

    def keep_saved_annotation(self, scan_layer, annotation: np.ndarray) -> None:
        """The user's saved mask of a scan whose saved results cannot be used (its file or the
        model changed): shown now as the scan's annotation layer, so the re-run the user is asked
        for keeps it, as a re-run keeps any annotation layer."""
        if layer_name(ANNOTATION, scan_layer.name) in self._viewer.layers:
            return
        placement = {"scale": scan_layer.scale, "translate": scan_layer.translate,
                     "metadata": {"nifti": scan_layer.metadata["nifti"]}}
        self._watch(self._add_annotation_layer(scan_layer, annotation, placement))

    def _add_annotation_layer(self, scan_layer, annotation: np.ndarray | None, placement: dict):
        """The scan's annotation layer, made from ``annotation`` (a mask on the scan's grid) or empty."""
        geometry = scan_layer.metadata["nifti"]
        start = np.zeros(geometry.display_shape, dtype=np.uint8) if annotation is None \
            else np.ascontiguousarray(geometry.to_display(np.asarray(annotation, dtype=np.uint8)))
        return self._viewer.add_labels(start, name=layer_name(ANNOTATION, scan_layer.name), **label_style(ANNOTATION),
                                       **placement)

    def _watch(self, layer) -> None:
        """Follow the edits of an annotation layer (once), so unexported edits are known."""
        if layer.unique_id not in self._watched:
            self._watched.add(layer.unique_id)
            layer.events.paint.connect(self._annotation_edited)

    def show_steps(self, session: ScanSession, scan_layer, placement: dict, *,
                   annotation: np.ndarray | None = None) -> Generator[None, None, None]:
        """A new run's session, pausing after each layer added (see ``_result_layers.StagedDisplay``):
        the proposal layer is made or refreshed; the annotation layer of this
        scan is kept as the user left it, or made from ``annotation`` (a saved mask on the
        scan's grid) or empty. What carries over from an earlier run of the same scan is the
        session's rule (``ScanSession.carry_over``), applied before it gets here."""
        self.session = session
        geometry = scan_layer.metadata["nifti"]
        layers = self._viewer.layers
        name = layer_name(ANNOTATION, scan_layer.name)
        if name in layers:
            self._state.annotation = layers[name]  # the user's: never removed, never rewritten
        else:
            self._state.annotation = self._add_annotation_layer(scan_layer, annotation, placement)
            yield
        self._watch(self.annotation_layer)
        self.proposal_layer = finish_labels(add_or_refresh(
            self._viewer, layer_name(PROPOSAL, scan_layer.name), "labels", self._open_proposal_display(),
            **label_style(PROPOSAL), **placement), PROPOSAL)
        self.proposal_layer.editable = False  # the model's: the user paints in the annotation
        yield
        # The outline of the finding under review is made when the user first goes to one (one
        # layer less to add while the window waits for the results); an earlier run's is emptied.
        marker_name = layer_name(UNDER_REVIEW, scan_layer.name)
        self._marker_placement = (marker_name, geometry.display_shape, placement)
        self.marker_layer = layers[marker_name] if marker_name in layers else None
        self._marked = self.marker_layer is not None  # so that _unmark empties an earlier run's outline
        self._unmark()
        self.raise_review_layers()
        layers.selection.active = self.annotation_layer  # napari swaps the layer controls: a turn of its own
        yield
        self.watch_window()
        self.refresh_proposal()
        yield
        self.refresh_table()

    def raise_review_layers(self) -> None:
        """The review's layers on top of everything: the proposal, the user's annotation above
        it, and the outline of the finding under review above both (an outline hides nothing).
        A map or scan added later (a re-run) must never cover or tint them."""
        layers = self._viewer.layers
        for layer in (self.proposal_layer, self.annotation_layer, self.marker_layer):
            if layer is None:
                continue
            index = next((i for i, other in enumerate(layers) if _same_layer(other, layer)), None)
            if index is not None and index != len(layers) - 1:
                layers.move(index, len(layers))

    def clear(self) -> None:
        """No session (another scan is in view, not run yet); the layers are the viewer's to remove."""
        self.marker_layer, self._marked, self._marker_placement = None, False, None
        self.proposal_layer = self.current = None
        self._state.clear_session()
        self.table.value = {"data": [], "index": [], "columns": list(COLUMNS)}
        self.title.value = "Findings: run the analysis first"

    def refresh(self) -> None:
        """The threshold, minimum size or median changed, or a decision was made: the proposal
        layer and the table follow; the annotation is left as it is."""
        self.refresh_proposal()
        self.refresh_table()

    def refresh_proposal(self) -> None:
        """Only the proposal layer (milliseconds: what a slider step redraws)."""
        if self.session is not None and self._has(self.proposal_layer):
            self.proposal_layer.data = self._open_proposal_display()
            self._unmark()  # the findings are renumbered at a new threshold: the outline goes

    def _unmark(self) -> None:
        if self._marked and self._has(self.marker_layer):
            self.marker_layer.data = np.zeros_like(self.marker_layer.data)
        self._marked = False

    def _marker(self):
        """The layer outlining the finding under review, made the first time (None when the
        user removed it: they chose not to see it)."""
        if self.marker_layer is None and self._marker_placement is not None:
            name, shape, placement = self._marker_placement
            self.marker_layer = finish_labels(self._viewer.add_labels(
                np.zeros(shape, dtype=np.uint8), name=name, **label_style(UNDER_REVIEW), **placement), UNDER_REVIEW)
            self.marker_layer.editable = False
            self._marker_placement = None
        return self.marker_layer if self._has(self.marker_layer) else None

    def _has(self, layer) -> bool:
        return layer is not None and any(_same_layer(other, layer) for other in self._viewer.layers)

    def refresh_table(self) -> None:
        if self.session is None:
            return
        self._state.findings = self.session.review(self.annotation_source())
        self.table.value = {"data": [_row(finding) for finding in self.findings],
                            "index": [str(finding.number) for finding in self.findings], "columns": list(COLUMNS)}
        self.title.value = _title(self.findings)
        if self.current is not None and self.current >= len(self.findings):
            self.current = len(self.findings) - 1 if self.findings else None
        if self.current is not None:
            self.table.native.selectRow(self.current)

    def annotation_source(self) -> np.ndarray | None:
        """The user's mask on the scan's own grid (bool), or None before a run."""
        if self.annotation_layer is None or self.session is None:
            return None
        geometry = self.session.analysis.scan.geometry
        return geometry.to_source(np.asarray(self.annotation_layer.data)) > 0

    def _open_proposal_display(self) -> np.ndarray:
        geometry = self.session.analysis.scan.geometry
        return geometry.to_display(self.session.open_proposal(self.annotation_source()))

    # ------------------------------------------------------------------ reviewing

    def go_to(self, row: int) -> None:
        """Make ``row`` the finding in view: its slice in every dimension, and the camera."""
        if self.session is None or not 0 <= row < len(self.findings):
            return
        self.current = row
        self.table.native.selectRow(row)
        finding = self.findings[row]
        geometry = self.session.analysis.scan.geometry
        world = geometry.source_index_to_world(finding.centre_voxel)
        self._viewer.dims.point = tuple(world)
        self._viewer.camera.center = tuple(world)
        marker = self._marker()
        if marker is not None:
            marker.data = geometry.to_display(self.session.finding_mask(finding.number).astype(np.uint8))
            self._marked = True
        self._zoom_to(finding)

    def _zoom_to(self, finding: Finding) -> None:
        """Zoom so the finding's surroundings fill the view: a field of view of four times its
        diameter, at least REVIEW_FIELD_MM; it only ever zooms in (a user who zoomed closer stays)."""
        size = getattr(self._viewer.canvas, "size", None)
        if size and min(size) > 0:
            self._viewer.camera.zoom = max(self._viewer.camera.zoom, float(min(size)) / _field_mm(finding))

    def step(self, direction: int) -> None:
        """The next (+1) or previous (-1) finding, wrapping around."""
        if not self.findings:
            return
        row = -1 if self.current is None and direction > 0 else (0 if self.current is None else self.current)
        self.go_to((row + direction) % len(self.findings))

    def accept_current(self) -> None:
        """Add the finding in view to the user's mask (undoable) and move on to the next open one."""
        finding = self._current_finding()
        if finding is None:
            return
        self._write_annotation(self.session.accept(finding.number), 1)
        self._after_decision()

    def reject_current(self) -> None:
        """Mark the finding in view as not a lesion (its voxels leave the user's mask if they were
        in it) and move on to the next open one."""
        finding = self._current_finding()
        if finding is None:
            return
        self._write_annotation(self.session.reject(finding.number), 0)
        self._after_decision()

    def _current_finding(self) -> Finding | None:
        if self.session is None or self.current is None or not 0 <= self.current < len(self.findings):
            return None
        return self.findings[self.current]

    def _write_annotation(self, voxels: np.ndarray, value: int) -> None:
        """Set the finding's voxels in the user's layer through napari's editing path, so the
        decision is one step of the layer's undo history."""
        display = self.session.analysis.scan.geometry.to_display(voxels)
        layer = self.annotation_layer
        changed = display & (np.asarray(layer.data) != value)
        if changed.any():
            layer.data_setitem(tuple(np.nonzero(changed)), value)
            self._state.record_edit(layer.unique_id, layer.name)

    def _after_decision(self) -> None:
        """On to the next finding that needs a look: nothing decided yet, or a part not seen."""
        from .session import OPEN, PART_ACCEPTED, PART_REJECTED

        decided = self.current
        self.refresh()
        self._state.edited()
        for offset in range(1, len(self.findings) + 1):
            row = (decided + offset) % len(self.findings)
            if self.findings[row].status in (OPEN, PART_ACCEPTED, PART_REJECTED):
                self.go_to(row)
                return

    def _annotation_edited(self, event):
        self._state.record_edit(event.source.unique_id, event.source.name)
        self._state.edited()

    @property
    def unsaved(self) -> bool:
        """Whether any annotation layer has edits that were not exported."""
        return self._state.unsaved

    @unsaved.setter
    def unsaved(self, value: bool) -> None:
        if value:
            raise ValueError("edits are recorded as they are made; only forgetting them can be asked")
        self._state.forget_unexported()

    def unexported_layers(self) -> list[str]:
        return self._state.unexported_layers()

    def mark_saved(self, layer) -> None:
        """An export wrote ``layer``: its edits are safe."""
        self._state.mark_exported(layer.unique_id)

    # ------------------------------------------------------------------ closing with edits

    def watch_window(self) -> None:
        """Watch the window this dock sits in for its closing (once it sits in one)."""
        window = self.native.window()
        if self._close_guard is None and window is not None and window is not self.native:
            self._close_guard = _AskBeforeClosing(self)
            window.installEventFilter(self._close_guard)


class _AskBeforeClosing(QObject):
    """Asks before the window closes while the user's mask has edits that were not exported;
    when the window does close, calls the review's ``on_close`` callbacks first."""

    def __init__(self, review: FindingsReview):
        super().__init__(review.native)
        self.review = review

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() != QEvent.Type.Close:
            return False
        for callback in self.review.before_close:
            callback()
        if not self.review.unsaved:
            return self._closing()
        names = ", ".join(f"“{name}”" for name in self.review.unexported_layers())
        answer = QMessageBox.question(
            watched, "Unsaved edits",
            f"{names} {'has' if len(self.review.unexported_layers()) == 1 else 'have'} edits that were not "
            "exported. Close anyway and lose them?",
            QMessageBox.StandardButton.Close | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        if answer == QMessageBox.StandardButton.Close:
            return self._closing()
        event.ignore()
        return True

    def _closing(self) -> bool:
        for callback in self.review.on_close:
            callback()
        return False  # the window goes on closing


def _same_layer(one, other) -> bool:
    """Whether two references are the same layer. napari hands plugins proxies of its objects,
    a new one on each access, so identity says nothing; a layer's unique id does."""
    return one.unique_id == other.unique_id


def _row(finding: Finding) -> list:
    # Fixed formats, so every row reads alike (a float cell would switch to 9.900e-02 for small scores).
    return [finding.number, finding.status, f"{finding.volume_ml:.3f}", f"{finding.mean_score:.4f}",
            f"{finding.max_score:.4f}", finding.axial_slice, finding.side]


def _title(findings: list[Finding]) -> str:
    from .session import ACCEPTED, OPEN, PART_ACCEPTED, PART_REJECTED, REJECTED  # torch: not at napari's start

    counts = {status: sum(f.status == status for f in findings)
              for status in (OPEN, ACCEPTED, REJECTED, PART_ACCEPTED, PART_REJECTED)}
    partly = counts[PART_ACCEPTED] + counts[PART_REJECTED]
    return (f"Findings: {len(findings)} — {counts[OPEN]} open, {counts[ACCEPTED]} accepted, "
            f"{counts[REJECTED]} rejected" + (f", {partly} partly decided" if partly else "")
            + " (click a row to go to it)")


def _field_mm(finding: Finding) -> float:
    """The field of view around a finding: four times its diameter, at least REVIEW_FIELD_MM."""
    diameter = 2.0 * (3.0 * finding.volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)  # mm, as a ball
    return max(REVIEW_FIELD_MM, 4.0 * diameter)
