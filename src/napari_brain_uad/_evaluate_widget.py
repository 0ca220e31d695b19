"""The Evaluate widget, for researchers: how well an anomaly map finds a ground-truth mask.

The numbers come from the core's ``evaluation``, so they are those ``brain-uad evaluate``
reports. For a map the main widget made, its layer carries the scan's session and the session
evaluates itself (``ScanSession.evaluate``) on the filtered map the main widget thresholds
(median-filtered, inside the eroded brain), with the session's minimum lesion size; for a map
read from a file, ``evaluation.evaluate_map`` takes its non-zero voxels as the region. Shown:
the Dice at the chosen threshold (of exactly the mask the main widget would export), the best
Dice over all thresholds ([Dice]), the area under the precision-recall curve (AUPRC) with its
chance level, and the curve with the threshold's operating point on it.
"""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import Container, FloatSpinBox, Label, PushButton, create_widget
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from .errors import BrainUADError, internal_error_message
from .nifti import ScanError

CURVE_POINTS = 400  # enough for a smooth line on a dock-sized plot


class PrecisionRecallPlot(QWidget):
    """Precision (up) against recall (right), both 0 to 1, with one marked operating point."""

    def __init__(self):
        super().__init__()
        self.setMinimumHeight(180)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.recall = np.empty(0)
        self.precision = np.empty(0)
        self.point: tuple[float, float] | None = None  # (recall, precision) at the threshold

    def set_curve(self, recall: np.ndarray, precision: np.ndarray, point: tuple[float, float] | None) -> None:
        if recall.size > CURVE_POINTS:  # thin out evenly along the curve, keeping both ends
            keep = np.unique(np.linspace(0, recall.size - 1, CURVE_POINTS).round().astype(int))
            recall, precision = recall[keep], precision[keep]
        self.recall, self.precision, self.point = recall, precision, point
        self.update()

    def paintEvent(self, event):
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        margin, width, height = 28, self.width(), self.height()
        plot_w, plot_h = width - 2 * margin, height - 2 * margin

        def at(recall: float, precision: float) -> QPointF:
            return QPointF(margin + recall * plot_w, margin + (1.0 - precision) * plot_h)

        painter.setPen(QPen(QColor(160, 160, 160), 1))
        painter.drawRect(margin, margin, plot_w, plot_h)
        painter.drawText(margin, height - 8, "recall →")
        painter.drawText(4, margin - 10, "precision")
        if self.recall.size:
            painter.setPen(QPen(QColor(255, 170, 40), 2))
            painter.drawPolyline(QPolygonF([at(r, p) for r, p in zip(self.recall, self.precision)]))
        if self.point is not None:
            painter.setPen(QPen(QColor(90, 200, 255), 2))
            painter.setBrush(QColor(90, 200, 255))
            painter.drawEllipse(at(*self.point), 4.0, 4.0)
        painter.end()


class EvaluateWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self.anomaly_map = create_widget(annotation=napari.layers.Image, label="Anomaly map")
        self.truth = create_widget(annotation=napari.layers.Labels, label="Ground truth")
        self.threshold = FloatSpinBox(label="Threshold", min=-1e9, max=1e9, step=1e-6, value=0.0)
        self.evaluate_button = PushButton(text="Evaluate")
        self.results = Label(value="")
        self.curve = PrecisionRecallPlot()
        self.extend([self.anomaly_map, self.truth, self.threshold, self.evaluate_button, self.results])
        self.native.layout().addWidget(self.curve)
        self.anomaly_map.changed.connect(self._take_threshold)
        self.evaluate_button.changed.connect(self._evaluate_and_show)
        self.scores: dict[str, float] = {}
        self.pr_curve: dict[str, np.ndarray] = {}
        self._take_threshold()

    def _take_threshold(self, *_):
        """Start from the threshold the main widget's session is at for this map."""
        layer = self.anomaly_map.value
        if layer is not None and "session" in layer.metadata:
            self.threshold.value = layer.metadata["session"].threshold

    def evaluate(self) -> dict[str, float]:
        layer, truth_layer = self.anomaly_map.value, self.truth.value
        if layer is None or truth_layer is None:
            raise BrainUADError("choose an anomaly map and a ground-truth mask")
        if truth_layer.data.shape != layer.data.shape:
            raise ScanError(f"the ground truth {truth_layer.data.shape} is not on the map's grid {layer.data.shape}")
        truth = np.asarray(truth_layer.data) > 0
        session = layer.metadata.get("session")
        if session is not None:
            # The session lives on the scan's source grid; bring the truth there.
            result = session.evaluate(layer.metadata["nifti"].to_source(truth), threshold=self.threshold.value)
        else:
            from .evaluation import evaluate_map  # brings torch and MONAI: only when asked

            result = evaluate_map(np.asarray(layer.data), truth, threshold=self.threshold.value, name=layer.name)
        if result.lesion_voxels == 0:
            raise ScanError("the ground truth has no voxel inside the evaluated brain region")
        self.scores = {key: getattr(result, key)
                       for key in ("dice", "best_dice", "auprc", "prevalence", "precision", "recall")}
        self.pr_curve = result.curve()
        return self.scores

    def _evaluate_and_show(self, *_):
        try:
            scores = self.evaluate()
        except BrainUADError as error:
            self.results.value = f"Error: {error}"
            return
        except Exception as error:
            self.results.value = f"Error: {internal_error_message(error, 'the evaluation')}"
            return
        self.results.value = (
            f"Dice at {self.threshold.value:.4g}: {scores['dice']:.3f}\n"
            f"[Dice] (best threshold): {scores['best_dice']:.3f}\n"
            f"AUPRC: {scores['auprc']:.3f} (chance: {scores['prevalence']:.4f})\n"
            f"at the threshold: precision {scores['precision']:.3f}, recall {scores['recall']:.3f}"
        )
        self.curve.set_curve(self.pr_curve["recall"], self.pr_curve["precision"],
                             (scores["recall"], scores["precision"]))
