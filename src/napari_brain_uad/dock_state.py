"""What one dock knows at a time, in one place, without Qt.

The dock's parts (the main widget, the findings' review, the worklist panel) used to keep their
own copies of the same facts — which worklist scan is in view, the session it shows, its
typicality, the edits not yet exported, the status line — and to reach into each other to read
them. :class:`DockState` holds each fact once; the parts read and write it here and follow
changes through its callback lists, so none needs its owner or its siblings.

The idea is micro-sam's one state object for its annotator, without its singleton: each dock
makes its own ``DockState`` (two docks in one process never share a scan or a status line).

What it holds of napari (the annotation layer) it only keeps and hands back: this module imports
neither Qt nor napari, so its rules are tested without a display.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Finding, ScanSession
    from .typicality import Typicality


def _notify(callbacks: list[Callable[..., Any]], *arguments: Any) -> None:
    # A copy: a callback may subscribe or unsubscribe others while they are being called.
    for callback in list(callbacks):
        callback(*arguments)


class DockState:
    """One dock's state: the worklist scan in view, its session and what the user did to it.

    Callback lists (append a callable to observe):

    - ``on_status(text)``: the status line changed;
    - ``on_session(session or None)``: the session shown was replaced (a run, a restore, the
      median filter redone) or cleared;
    - ``on_edit()``: the user changed the session shown (a decision, a stroke, the threshold,
      the minimum size, the median): whoever keeps it on disk saves it.
    """

    def __init__(self) -> None:
        self.on_status: list[Callable[[str], None]] = []
        self.on_session: list[Callable[[ScanSession | None], None]] = []
        self.on_edit: list[Callable[[], None]] = []
        self._status = ""
        self._entry: str | None = None
        self.scan_layer_id: Any = None  # the unique id of the layer the entry in view opened
        # Whether the worklist keeps the session shown (it saved its results): until then an
        # edit has nowhere to be saved.
        self.session_kept = False
        self._session: ScanSession | None = None
        self.typicality: Typicality | None = None  # of the results shown, when the model stores one
        self.findings: list[Finding] = []  # the session's findings as the review table lists them
        self.annotation: Any = None  # the user's mask layer for the session shown (None before a run)
        self.analysing = False  # the scan in view is being analysed (Run): the worklist waits
        # Annotation layers (one per scan reviewed) with edits not yet exported: unique id -> name.
        # Kept per layer, so moving on to another scan never forgets the last one's.
        self._unexported: dict[Any, str] = {}

    # ------------------------------------------------------------------ the status line

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, text: str) -> None:
        self._status = text
        _notify(self.on_status, text)

    # ------------------------------------------------------------------ the worklist scan in view

    @property
    def entry(self) -> str | None:
        """The id of the worklist scan in view (None: no worklist, or none opened yet)."""
        return self._entry

    def open_entry(self, entry_id: str | None, scan_layer_id: Any = None) -> None:
        """Another worklist scan is in view: until its session is shown and kept, nothing is saved
        for it."""
        self._entry, self.scan_layer_id, self.session_kept = entry_id, scan_layer_id, False

    def is_entry_layer(self, layer: Any) -> bool:
        """Whether ``layer`` is the scan layer the worklist opened for the entry in view."""
        return self._entry is not None and layer is not None and getattr(layer, "unique_id", None) == self.scan_layer_id

    # ------------------------------------------------------------------ the session shown

    @property
    def session(self) -> ScanSession | None:
        """The latest results shown and the user's choices on them."""
        return self._session

    @session.setter
    def session(self, session: ScanSession | None) -> None:
        self._session = session
        _notify(self.on_session, session)

    def clear_session(self) -> None:
        """No results in the dock (another scan is in view, not run yet)."""
        self.typicality, self.findings, self.annotation = None, [], None
        self.session = None

    def edited(self) -> None:
        """The user changed the session shown."""
        _notify(self.on_edit)

    # ------------------------------------------------------------------ edits not exported

    def record_edit(self, layer_id: Any, name: str) -> None:
        """The user's mask layer ``layer_id`` changed: it has edits to export. (Whoever changed it
        calls :meth:`edited` once its change is whole: a decision is one edit, not one per layer.)"""
        self._unexported[layer_id] = name

    def mark_exported(self, layer_id: Any) -> None:
        """The layer was written (exported, or saved with a worklist session): its edits are safe."""
        self._unexported.pop(layer_id, None)

    def forget_unexported(self) -> None:
        self._unexported.clear()

    @property
    def unsaved(self) -> bool:
        """Whether any annotation layer has edits that were not exported."""
        return bool(self._unexported)

    def unexported_layers(self) -> list[str]:
        return list(self._unexported.values())
