"""How the plugin's layers look in napari: the one place for their colours, opacities and names.

A user reading the canvas must tell at a glance what each overlay is, so each role a mask can
play has its own colour and its own name:

- the model's **proposal** (what the threshold gives; a yellow outline, so the scan and the
  map inside it stay readable),
- the **finding under review** (a thick white outline; the view zooms to it),
- the user's **annotation** (the mask they accepted and edit; filled green, always above the map),
- a **reference** mask opened from disk (an expert's lesion or tumour mask; magenta),
- the **brain** the run found (drawn as a light-blue outline, so the anatomy inside stays visible).

Every non-zero label of a mask gets its role's colour (a multi-class tumour mask reads as one
reference); background is transparent. The anomaly map is one colour family, dark red to light
red, and fully transparent below a floor tied to the model's healthy threshold
(:func:`anomaly_map_limits`): the healthy brain keeps its own grey values, however bright the
scan, and only what scores near or above the threshold is tinted.

napari's Labels take ``colormap`` and ``opacity`` when they are made, but ``contour`` only once
they exist, hence two steps: :func:`label_style` for the constructor (``add_labels`` or a
reader's LayerData) and :func:`finish_labels` for what must be set afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.utils.colormaps import Colormap, DirectLabelColormap

PROPOSAL = "proposal"
ANNOTATION = "annotation"
REFERENCE = "reference"
BRAIN = "brain"
UNDER_REVIEW = "under review"

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class LabelLook:
    colour: str  # every non-zero label's colour
    opacity: float
    contour: int  # 0: filled; n > 0: drawn as an outline n voxels thick
    name_format: str  # the layer's name from the name of what it belongs to (scan or file)


LABEL_LOOKS = {
    # Filled, but translucent enough that the scan under a proposal can be judged.
    PROPOSAL: LabelLook(colour="#ffd400", opacity=0.9, contour=1, name_format="{} proposal"),
    # The one finding the review is on: white, thicker than any other outline.
    UNDER_REVIEW: LabelLook(colour="#ffffff", opacity=1.0, contour=2, name_format="{} finding under review"),
    # The user's own work, and what gets exported: the most opaque.
    ANNOTATION: LabelLook(colour="#2fd45a", opacity=0.7, contour=0, name_format="{} annotation"),
    # Someone else's answer, shown for comparison: a colour no result of ours uses.
    REFERENCE: LabelLook(colour="#ff2bd6", opacity=0.6, contour=0, name_format="{} (reference)"),
    # A filled brain would cover the whole scan: an outline shows where it ends and what it holds.
    BRAIN: LabelLook(colour="#7fc8ff", opacity=0.8, contour=1, name_format="{} brain"),
}

# The anomaly map: transparent at and below its floor, then dark red to light red, half opaque
# at most, drawn over the scan (translucent, not additive: a bright T1 under an additive map
# saturated to white).
ANOMALY_COLORMAP = Colormap(
    colors=[[0.0, 0.0, 0.0, 0.0], [0.55, 0.0, 0.0, 0.35], [0.95, 0.1, 0.1, 0.6], [1.0, 0.7, 0.7, 0.75]],
    controls=[0.0, 0.001, 0.6, 1.0], name="brain-uad anomaly",
)
ANOMALY_MAP_STYLE = {"colormap": ANOMALY_COLORMAP, "blending": "translucent", "opacity": 1.0}
# The map fades in from this share of the model's healthy threshold (healthy-99: 1 % of healthy
# brain scores above it), so tissue scoring well below it stays untinted. Without a calibrated
# threshold, from this percentile of the brain's own scores.
MAP_FLOOR_SHARE_OF_HEALTHY = 0.5
MAP_FLOOR_PERCENTILE = 95.0


def label_style(kind: str) -> dict:
    """Keyword arguments for a Labels layer of this role (``add_labels``, or a reader's LayerData):
    every non-zero label in the role's colour, background transparent, and the role's opacity."""
    look = LABEL_LOOKS[kind]
    colormap = DirectLabelColormap(color_dict={None: look.colour, 0: TRANSPARENT})
    return {"colormap": colormap, "opacity": look.opacity}


def finish_labels(layer, kind: str):
    """What napari sets only on an existing Labels layer (the outline); returns the layer."""
    layer.contour = LABEL_LOOKS[kind].contour
    return layer


def layer_name(kind: str, owner: str) -> str:
    """The layer's name for this role: ``layer_name(PROPOSAL, "MSLUB T1")`` is "MSLUB T1 proposal"."""
    return LABEL_LOOKS[kind].name_format.format(owner)


def named_after(name: str, owner: str) -> bool:
    """Whether the layer called ``name`` is one of ``owner``'s own (its results and review
    layers are all named "<owner> <what>")."""
    return name.startswith(f"{owner} ")


def anomaly_map_style() -> dict:
    """Keyword arguments for the anomaly map's Image layer (its contrast limits from
    :func:`anomaly_map_limits`)."""
    return dict(ANOMALY_MAP_STYLE)


def anomaly_map_limits(scores: np.ndarray, healthy_threshold: float | None) -> tuple[float, float]:
    """The map's contrast limits: from the floor (transparent) to the highest score. ``scores``:
    the filtered scores inside the brain; ``healthy_threshold``: the model's, when calibrated."""
    scores = np.asarray(scores, dtype=np.float64)
    high = float(scores.max()) if scores.size else 1.0
    if healthy_threshold is not None and healthy_threshold > 0:
        floor = MAP_FLOOR_SHARE_OF_HEALTHY * float(healthy_threshold)
    else:
        floor = float(np.percentile(scores, MAP_FLOOR_PERCENTILE)) if scores.size else 0.0
    if not floor < high:
        floor = high - max(abs(high), 1.0) * 1e-3  # a map scoring nowhere above the floor: its top still shows
    return floor, high
