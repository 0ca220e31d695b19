"""A session's results as layers on the scan's own display grid: the reconstruction, the anomaly
map, the spread of the samples, the model's extra maps (SADM's segmentation, PHANES's mask, ...)
and a brain the run found itself. The review's layers (proposal, annotation) are ``_review``'s.

The anomaly map layer carries the session (``metadata["session"]``), which the Evaluate widget
reads; it follows the dock's state, so a re-filtered session replaces it there too. How the
layers look (colours, opacities, names) comes from ``_styles``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

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

    def show(self, scan_layer, session: ScanSession) -> tuple[dict, object | None]:
        """The session's layers over ``scan_layer``. Returns the placement shared by every layer
        of the scan (scale, translate, metadata) and the brain layer the run found (None when
        the brain mask was given)."""
        analysis, metadata = session.analysis, session.model_metadata
        geometry = scan_layer.metadata["nifti"]
        placement = {"scale": scan_layer.scale, "translate": scan_layer.translate,
                     "metadata": {"nifti": geometry, "model": metadata.get("kind")}}
        name = scan_layer.name
        self._replace(f"{name} reconstruction", "image", geometry.to_display(analysis.reconstruction),
                      colormap="gray", contrast_limits=scan_layer.contrast_limits, visible=False, **placement)
        self.map_layer = self._replace(
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
        return placement, self._show_brain(scan_layer, analysis, placement)

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
        """Add a result layer, or refresh the one of the same name from an earlier run."""
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        add = self._viewer.add_labels if kind == "labels" else self._viewer.add_image
        return add(data, name=name, **kwargs)


def _healthy_value(session: ScanSession) -> float | None:
    """The model's healthy threshold for the session's scorer, when it was calibrated."""
    from .thresholds import default_threshold

    healthy = default_threshold(session.model_metadata, session.scorer)
    return None if healthy is None else float(healthy.value)
