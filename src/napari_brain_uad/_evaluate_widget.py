"""The Evaluate widget, for researchers: how well an anomaly map finds a ground-truth mask.

Numbers come from the core's ``metrics`` on the same filtered map the main widget thresholds
(median-filtered, inside the eroded brain), so they are the papers' protocol: Dice at the
chosen threshold (after removing small components), the best Dice over all thresholds
([Dice]) and the area under the precision-recall curve (AUPRC).
"""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import Container, FloatSpinBox, Label, PushButton, create_widget

from .metrics import auprc, best_dice, dice


class EvaluateWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.anomaly_map = create_widget(annotation=napari.layers.Image, label="Anomaly map")
        self.truth = create_widget(annotation=napari.layers.Labels, label="Ground truth")
        self.threshold = FloatSpinBox(label="Threshold", min=-1e9, max=1e9, step=1e-6, value=0.0)
        self.evaluate_button = PushButton(text="Evaluate")
        self.results = Label(value="")
        self.extend([self.anomaly_map, self.truth, self.threshold, self.evaluate_button, self.results])
        self.anomaly_map.changed.connect(self._take_threshold)
        self.evaluate_button.changed.connect(self._evaluate_and_show)
        self.scores: dict[str, float] = {}
        self._take_threshold()

    def _take_threshold(self, *_):
        """Start from the threshold the main widget's slider is at for this map."""
        layer = self.anomaly_map.value
        if layer is not None and "threshold" in layer.metadata:
            self.threshold.value = float(layer.metadata["threshold"])

    def evaluate(self) -> dict[str, float]:
        layer, truth_layer = self.anomaly_map.value, self.truth.value
        if layer is None or truth_layer is None:
            raise ValueError("choose an anomaly map and a ground-truth mask")
        if truth_layer.data.shape != layer.data.shape:
            raise ValueError(f"the ground truth {truth_layer.data.shape} is not on the map's grid {layer.data.shape}")
        analysis = layer.metadata.get("analysis")
        truth_display = np.asarray(truth_layer.data) > 0
        if analysis is not None:
            # The analysis lives on the source grid; bring the truth there once.
            truth = layer.metadata["nifti"].to_source(truth_display)
            values, region = analysis.filtered.values, analysis.filtered.region
            predicted = analysis.mask_at(self.threshold.value) > 0
        else:  # a map from a file: its non-zero voxels are the region it covers
            values = np.asarray(layer.data, dtype=np.float32)
            truth, region = truth_display, values != 0
            predicted = (values > self.threshold.value) & region
        if not truth[region].any():
            raise ValueError("the ground truth has no voxel inside the evaluated brain region")
        self.scores = {
            "dice": dice(predicted, truth & region),
            "best_dice": best_dice(values, truth, region),
            "auprc": auprc(values, truth, region),
            "prevalence": float(truth[region].mean()),
        }
        return self.scores

    def _evaluate_and_show(self, *_):
        try:
            scores = self.evaluate()
        except ValueError as error:
            self.results.value = f"Error: {error}"
            return
        self.results.value = (
            f"Dice at {self.threshold.value:.4g}: {scores['dice']:.3f}\n"
            f"[Dice] (best threshold): {scores['best_dice']:.3f}\n"
            f"AUPRC: {scores['auprc']:.3f} (chance: {scores['prevalence']:.4f})"
        )
