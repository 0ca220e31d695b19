"""The widget's long work off the GUI thread, and how each way it can end reaches the user.

These pieces of work run in napari workers (with a progress bar in napari's activity dock): the
analysis of a scan (loading the model, then ``analysis.analyse_scan``), the median re-filtering
of a session, and for a worklist the restoring of a saved scan and the analysis of the next
scan in the background. Their outcome is sorted in the worker thread and handed to the GUI
thread through the callbacks the widget gives:

- the user pressed Cancel (``reconstruct.Cancelled``): ``cancelled()``, and nothing comes back;
- a failure the user can fix (a ``BrainUADError``: a scan that cannot be read, a model that is
  not available or refused, settings that do not go together): ``failed(its message)``;
- any other exception is a bug: its traceback is logged and ``failed`` gets the plain
  internal-error line (``errors.internal_error_message``), never a guess that the user erred;
- else ``done(result)``.

When the window closes, :func:`finish_running_work` lets every worker started here end (after
the widget has set their cancel events) while their outcomes still reach live widgets: a worker
thread must never outlive the widgets it reports to, or the process dies on exit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.qt.threading import FunctionWorker, create_worker
from qtpy.QtCore import QEventLoop, QObject, Signal
from qtpy.QtWidgets import QApplication

from .errors import BrainUADError, internal_error_message

if TYPE_CHECKING:
    import numpy as np

    from .analysis import AnalysisSettings, ScanAnalysis
    from .nifti import NiftiVolume
    from .session import ScanSession
    from .worklist import RestoredScan, Worklist


_log = logging.getLogger(__name__)

# Every worker started by :func:`_start` that has not finished yet (the thread pool is the
# process's, so this set is too).
_running: set[FunctionWorker] = set()


def running_work() -> int:
    """How many workers started here have not finished."""
    return len(_running)


def finish_running_work(timeout_s: float = 30.0) -> bool:
    """Wait until every worker started here has finished, handling the GUI thread's events
    meanwhile (not the user's input), so each worker's outcome and ``finished`` reach their
    callbacks in order. Set the workers' cancel events first. True when all ended in time."""
    deadline = time.monotonic() + timeout_s
    while _running and time.monotonic() < deadline:
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents, 50)
        time.sleep(0.01)
    if _running:
        _log.warning("%d background task(s) still running after %.0f s", len(_running), timeout_s)
    return not _running


class ProgressRelay(QObject):
    """Carries progress (fraction done, stage) from a worker thread to the GUI thread: Qt
    queues a signal emitted in another thread than its receiver's."""

    changed = Signal(float, str)


def start_analysis(
    scan: NiftiVolume,
    brain_mask: np.ndarray | None,
    model_source: str | Path,
    settings: AnalysisSettings,
    *,
    relay: ProgressRelay,
    cancel: threading.Event,
    done: Callable[[ScanAnalysis, dict], None],
    cancelled: Callable[[], None],
    failed: Callable[[str], None],
    finished: Callable[[], None],
) -> FunctionWorker:
    """Load the model (a registry name or a checkpoint file) and analyse ``scan`` in a worker,
    reporting progress through ``relay`` and stopping soon after ``cancel`` is set.
    ``done(analysis, model metadata)``; ``finished()`` comes last, whatever the outcome."""

    def work() -> tuple[ScanAnalysis, dict] | None:
        # The models bring torch and MONAI (seconds to import): only when a run starts.
        from .analysis import analyse_scan
        from .model_registry import resolve_model
        from .models import load_model
        from .reconstruct import Cancelled

        relay.changed.emit(0.0, "model")
        try:
            model, metadata = load_model(resolve_model(model_source))
            analysis = analyse_scan(scan, model, brain_mask=brain_mask, settings=settings,
                                    progress=relay.changed.emit, cancelled=cancel.is_set)
        except Cancelled:
            return None  # the user's choice, not a failure
        return analysis, metadata

    def sorted_result(result: tuple[ScanAnalysis, dict] | None) -> None:
        if result is None:
            cancelled()
        else:
            done(*result)

    return _start(work, "the analysis", "Brain UAD", done=sorted_result, failed=failed, finished=finished)


def start_refilter(
    session: ScanSession,
    median: bool,
    *,
    done: Callable[[ScanSession], None],
    failed: Callable[[str], None],
    finished: Callable[[], None],
) -> FunctionWorker:
    """Switch ``session``'s median filter in a worker: ``done(the new session)``; the network
    does not run again."""
    return _start(lambda: session.with_median(median), "the median filter", "Median filter",
                  done=done, failed=failed, finished=finished)


def start_restore(
    worklist: Worklist,
    entry_id: str,
    *,
    done: Callable[[RestoredScan | None], None],
    failed: Callable[[str], None],
    finished: Callable[[], None],
) -> FunctionWorker:
    """Read a worklist scan back as the user left it (its saved results and review, checked
    against the scan's and the model's hashes; the network does not run): ``done(restored)``,
    None when it has no results yet."""

    def work():
        from .worklist import model_file_sha256

        model = worklist.records[entry_id].model
        return worklist.restore(entry_id, model_sha256=model_file_sha256(model))

    return _start(work, "restoring the scan", "Restoring", done=done, failed=failed, finished=finished)


def start_background_run(
    worklist: Worklist,
    entry_id: str,
    model_source: str | Path,
    settings: AnalysisSettings,
    *,
    cancel: threading.Event,
    done: Callable[[bool], None],
    failed: Callable[[str], None],
    finished: Callable[[], None],
) -> FunctionWorker:
    """Analyse a worklist scan from its files and save its results while the user reviews
    another: ``done(True)``, or ``done(False)`` when cancelled. A failure is also recorded in
    the worklist (the scan's status says failed, with the message)."""

    def work() -> bool:
        from .reconstruct import Cancelled

        try:
            worklist.run(entry_id, str(model_source), settings=settings, cancelled=cancel.is_set)
        except Cancelled:
            return False
        return True

    return _start(work, "the background analysis", f"Analysing {entry_id}", done=done, failed=failed,
                  finished=finished)


def _start(work: Callable[[], Any], where: str, description: str, *, done: Callable[[Any], None],
           failed: Callable[[str], None], finished: Callable[[], None]) -> FunctionWorker:
    """Run ``work`` in a started napari worker; ``done`` or ``failed`` then ``finished`` in the
    GUI thread."""

    def guarded() -> tuple[bool, Any]:
        try:
            return True, work()
        except BrainUADError as error:
            return False, str(error)
        except Exception as error:  # a bug: logged with its traceback, one plain line shown
            return False, internal_error_message(error, where)

    def deliver(outcome: tuple[bool, Any]) -> None:
        succeeded, value = outcome
        if succeeded:
            done(value)
        else:
            failed(value)

    worker = create_worker(guarded, _progress={"desc": description})
    worker.returned.connect(deliver)
    worker.finished.connect(finished)
    worker.finished.connect(lambda: _running.discard(worker))  # after the caller's ``finished``
    _running.add(worker)
    worker.start()
    return worker
