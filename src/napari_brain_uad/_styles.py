"""How the plugin's layers look in napari: the one place for their colours, opacities and names.

A user reading the canvas must tell at a glance what each overlay is, so each role a mask can
play has its own colour and its own name:

- the model's **proposal** (what the threshold gives; orange),
- the user's **annotation** (the mask they accepted and edit; green),
- a **reference** mask opened from disk (an expert's lesion or tumour mask; magenta),
- the **brain** the run found (drawn as a light-blue outline, so the anatomy inside stays visible).

Every non-zero label of a mask gets its role's colour (a multi-class tumour mask reads as one
reference); background is transparent. The anomaly map is drawn with additive blending over the
scan: its low scores are black and so add nothing, and only high scores tint the anatomy.

napari's Labels take ``colormap`` and ``opacity`` when they are made, but ``contour`` only once
they exist, hence two steps: :func:`label_style` for the constructor (``add_labels`` or a
reader's LayerData) and :func:`finish_labels` for what must be set afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from napari.utils.colormaps import DirectLabelColormap

PROPOSAL = "proposal"
ANNOTATION = "annotation"
REFERENCE = "reference"
BRAIN = "brain"

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class LabelLook:
    colour: str  # every non-zero label's colour
    opacity: float
    contour: int  # 0: filled; n > 0: drawn as an outline n voxels thick
    name_format: str  # the layer's name from the name of what it belongs to (scan or file)


LABEL_LOOKS = {
    # Filled, but translucent enough that the scan under a proposal can be judged.
    PROPOSAL: LabelLook(colour="#ff8c1a", opacity=0.6, contour=0, name_format="{} proposal"),
    # The user's own work, and what gets exported: the most opaque.
    ANNOTATION: LabelLook(colour="#2fd45a", opacity=0.7, contour=0, name_format="{} annotation"),
    # Someone else's answer, shown for comparison: a colour no result of ours uses.
    REFERENCE: LabelLook(colour="#ff2bd6", opacity=0.6, contour=0, name_format="{} (reference)"),
    # A filled brain would cover the whole scan: an outline shows where it ends and what it holds.
    BRAIN: LabelLook(colour="#7fc8ff", opacity=0.8, contour=1, name_format="{} brain"),
}

# The anomaly map over its scan: black (the lowest score shown) adds nothing with additive
# blending, so only high scores tint the anatomy, and at half opacity even they let it through.
ANOMALY_MAP_STYLE = {"colormap": "inferno", "blending": "additive", "opacity": 0.5}


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


def anomaly_map_style() -> dict:
    """Keyword arguments for the anomaly map's Image layer (its contrast limits are the caller's)."""
    return dict(ANOMALY_MAP_STYLE)
