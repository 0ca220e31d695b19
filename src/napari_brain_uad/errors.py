"""Expected failures, and how a door tells them from bugs.

Every failure a user can cause or fix — a scan that cannot be read, a model that is not
available, a checkpoint that is refused, settings that do not go together, an output file that
already exists — is a :class:`BrainUADError` whose message says what is wrong and, where it
can, what to do. The doors (the widgets, ``brain-uad``, ``brain-uad-train``,
``brain-uad-calibrate``) catch this one class and show its message as it is. Any other
exception is a bug: the doors log its traceback and tell the user plainly that an internal error
happened, rather than dressing it up as a user mistake.

The subclasses live beside the code that raises them (``nifti.ScanError``,
``checkpoint.CheckpointError``, ``model_registry.ModelUnavailable``, …); this module holds only
what they share. No Qt, napari or torch import here.
"""

from __future__ import annotations

import logging
import traceback

LOG = logging.getLogger("napari_brain_uad")


class BrainUADError(Exception):
    """A failure the user can fix; its message is meant for them.

    Most subclasses are also ``ValueError`` (a file, a name or a setting the user gave cannot be
    used); this base is not, because napari turns a writer's ``ValueError`` into a vague "not a
    valid writer" warning, and a refused export must reach the user with its reason."""


class SettingsError(BrainUADError, ValueError):
    """Settings that cannot be used together (scorer, samples, threshold, …)."""


class OutputExists(BrainUADError, FileExistsError):
    """An output file is already there; it is never replaced without being asked."""


def internal_error_message(error: BaseException, where: str) -> str:
    """Log ``error``'s traceback as a bug and return the line to show the user instead."""
    LOG.error("internal error in %s:\n%s", where, "".join(traceback.format_exception(error)))
    return (f"internal error ({type(error).__name__}: {error}); this is a bug in napari-brain-uad, "
            "not a problem with your data: please report it with the log")


class Cancelled(Exception):
    """The user cancelled the work (an analysis, a reconstruction, a brain extraction);
    nothing was returned. Not an error: the doors report it as a choice."""
