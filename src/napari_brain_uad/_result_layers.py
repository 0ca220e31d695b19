"""A session's results as layers on the scan's own display grid: the reconstruction, the anomaly
map, the spread of the samples, the model's extra maps (SADM's segmentation, PHANES's mask, ...)
and a brain the run found itself. The review's layers (proposal, annotation) are ``_review``'s.

The anomaly map layer carries the session (``metadata["session"]``), which the Evaluate widget
reads; it follows the dock's state, so a re-filtered session replaces it there too. How the
layers look (colours, opacities, names) comes from ``_styles``.

Showing results is written as steps (generators that pause after each layer napari adds) so that
:class:`StagedDisplay` can spread a run's results over turns of Qt's event loop: napari needs
about 0.1 s to add a layer, and a run's five or six at once froze the window for 0.8 s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QTimer

from ._styles import BRAIN, anomaly_map_limits, anomaly_map_style, finish_labels, label_style, layer_name
from .brain_mask import GIVEN

if TYPE_CHECKING:
    import napari

    from .analysis import ScanAnalysis
    from .dock_state import DockState
    from .session import ScanSession


class ResultLayers:
    """Makes (or refreshes, after a re-run) the result layers of the scan in view."""

    def __init__(self, viewer: napari.viewer.Viewer, state: DockState):
        self._viewer = viewer
        self.map_layer = None
        state.on_session.append(self._session_replaced)

    def _session_replaced(self, session: ScanSession | None) -> None:
        if session is None:
            self.map_layer = None  # another scan: its layers are the viewer's to remove
        elif self.map_layer is not None:
            self.map_layer.metadata["session"] = session

    def show_steps(self, scan_layer, session: ScanSession) -> Generator[None, None, tuple[dict, object | None]]:
        """The session's layers over ``scan_layer``, pausing after each. Returns the placement
        shared by every layer of the scan (scale, translate, metadata) and the brain layer the
        run found (None when the brain mask was given)."""
        analysis, metadata = session.analysis, session.model_metadata
        geometry = scan_layer.metadata["nifti"]
        placement = {"scale": scan_layer.scale, "translate": scan_layer.translate,
                     "metadata": {"nifti": geometry, "model": metadata.get("kind")}}
        name = scan_layer.name
        self._replace(f"{name} reconstruction", "image", geometry.to_display(analysis.reconstruction),
                      colormap="gray", contrast_limits=scan_layer.contrast_limits, visible=False, **placement)
        yield
        self.map_layer = self._replace(
            f"{name} anomaly map", "image", geometry.to_display(analysis.anomaly_map), **anomaly_map_style(),
            contrast_limits=anomaly_map_limits(analysis.filtered.scores(), _healthy_value(session)),
            **{**placement, "metadata": {**placement["metadata"], "session": session}},
        )
        yield
        if analysis.spread is not None:
            self._replace(f"{name} spread", "image", geometry.to_display(analysis.spread), colormap="viridis",
                          blending="additive", visible=False, **placement)
            yield
        for map_name, values in analysis.model_maps.items():  # SADM's segmentation, PHANES's mask, ...
            self._replace(f"{name} {map_name}", "image", geometry.to_display(values), colormap="magma",
                          blending="additive", visible=False, **placement)
            yield
        brain = self._show_brain(scan_layer, analysis, placement)
        if brain is not None:
            yield
        return placement, brain

    def _show_brain(self, scan_layer, analysis: ScanAnalysis, placement: dict):
        """A brain the run found itself (skull-stripped scan, or extracted) becomes a Labels layer
        drawn as an outline: the dock chooses it as the brain mask, so the user can check and
        correct it, and the next run uses it as corrected."""
        if analysis.brain.source == GIVEN:
            return None
        geometry = scan_layer.metadata["nifti"]
        layer = self._replace(layer_name(BRAIN, scan_layer.name), "labels",
                              geometry.to_display(analysis.brain.mask.astype(np.uint8)), **label_style(BRAIN),
                              **{**placement, "metadata": {**placement["metadata"], "role": BRAIN}})
        return finish_labels(layer, BRAIN)

    def _replace(self, name, kind, data, **kwargs):
        return add_or_refresh(self._viewer, name, kind, data, **kwargs)


def add_or_refresh(viewer: napari.viewer.Viewer, name: str, kind: str, data: np.ndarray, **kwargs):
    """Add a result layer (``kind`` "image" or "labels"), or give the layer of that name from an
    earlier run of the scan its new data, contrast limits and metadata in place.

    In place, because a re-run must not undo what the user set on the layer (visible, opacity,
    colormap), and because napari runs a full garbage collection for every layer removed: a third
    of a second each with torch loaded, seconds of frozen window for a re-run's six layers."""
    import napari

    layers = viewer.layers
    if name in layers:
        layer = layers[name]
        same_kind = isinstance(layer, napari.layers.Labels) == (kind == "labels")
        if same_kind and layer.data.shape == np.shape(data):
            layer.data = data
            for setting in ("contrast_limits", "metadata", "scale", "translate"):
                if setting in kwargs:
                    setattr(layer, setting, kwargs[setting])
            return layer
        layers.remove(name)
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=name, **kwargs)


def _healthy_value(session: ScanSession) -> float | None:
    """The model's healthy threshold for the session's scorer, when it was calibrated."""
    from .thresholds import default_threshold

    healthy = default_threshold(session.model_metadata, session.scorer)
    return None if healthy is None else float(healthy.value)


def run_now(steps: Generator):
    """Run all of ``steps`` at once; what they return."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class StagedDisplay:
    """Runs showing steps one per turn of Qt's event loop, so the window redraws and answers
    between two layers; then what waits for the display to be complete (``after``)."""

    def __init__(self, parent):
        self._steps: Generator | None = None
        self._then: list[Callable[[], None]] = []
        self._timer = QTimer(parent)  # dies with the dock, never fires after it
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._turn)

    @property
    def pending(self) -> bool:
        return self._steps is not None

    def start(self, steps: Generator) -> None:
        self.finish()  # an earlier display is completed first, never mixed with this one
        self._steps = steps
        self._timer.start()

    def after(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the display is complete (now when none is under way)."""
        if self._steps is None:
            callback()
        else:
            self._then.append(callback)

    def finish(self) -> None:
        """The rest of the display now (the user switches scans, runs again or closes)."""
        self._timer.stop()
        while self._step():
            pass

    def _turn(self) -> None:
        if self._step():
            self._timer.start()

    def _step(self) -> bool:
        """One step; False once the display is complete (or failed: a bug, logged, and what
        waits for the display still runs, so the dock never stays busy)."""
        if self._steps is None:
            return False
        try:
            next(self._steps)
            return True
        except StopIteration:
            pass
        except Exception:
            logging.getLogger(__name__).exception("showing the results failed")
        self._steps = None
        waiting, self._then = self._then, []
        for callback in waiting:
            callback()
        return False
