"""napari's File > Open Sample entries: real scans from the sample registry.

A multi-contrast sample opens with its first contrast shown and the others hidden (stacked, they
would hide each other; the layer list shows them with one click), and its masks shown."""

from __future__ import annotations

from functools import partial

from ._reader import layer_data
from .sample_registry import fetch, registry, sample_files


def _napari_progress(description: str):
    from napari.utils import progress

    return progress(desc=description)


def load_sample(sample: str) -> list[tuple]:
    layers = []
    for layer in sample_files(sample):
        path = fetch(layer["file"], progressbar=partial(_napari_progress, f"Downloading {layer['name']}"))
        layers.append(layer_data(str(path), name=layer["name"], labels=bool(layer.get("labels"))))
    dataset = registry()["files"][sample_files(sample)[0]["file"]]["dataset"]
    source = registry()["datasets"][dataset]
    for _, kwargs, _ in layers:
        kwargs["metadata"]["sample"] = {"licence": source["licence"], "attribution": source["attribution"]}
    images = [kwargs for _, kwargs, kind in layers if kind == "image"]
    for kwargs in images[1:]:
        kwargs["visible"] = False
    return layers


def ixi_healthy_t1() -> list[tuple]:
    return load_sample("ixi-healthy-t1")


def mslub_patient26() -> list[tuple]:
    return load_sample("mslub-patient26")


def brats_glioma() -> list[tuple]:
    return load_sample("brats-glioma")
