"""Screenshots of the review workflow for the documentation (docs/reading-scans.md; the README
shows the first): the real napari window with our dock.

Run under a display (``xvfb-run -a -s "-screen 0 1280x900x24"`` without one):
    NAPARI_BRAIN_UAD_DATA=../shared/data .venv/bin/python scripts/make_review_screenshots.py

It opens the MSLUB sample, runs the bundled default model, goes to the largest finding and
accepts it, rejects the next, and saves two pictures in docs/: the review in progress (the
anomaly map in red where it scores near the healthy threshold, the model's open proposal as
yellow outlines, the finding under review in white, the user's accepted mask in green, the
findings table), and the slice with the most lesion in the expert's mask opened from disk
(magenta) for comparison.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

DOCS = Path(__file__).resolve().parents[1] / "docs"


def wait_for(condition, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        QApplication.processEvents()
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the viewer to finish its work")
        time.sleep(0.05)


def main() -> int:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    viewer.layers["MSLUB lesion mask"].visible = False
    widget.scan.value = viewer.layers["MSLUB T1"]
    widget.run()
    wait_for(lambda: widget._worker is None)
    if not widget.status.value.startswith("Done"):
        raise SystemExit(widget.status.value)
    review = widget.review
    review.step(+1)
    review.accept_current()
    review.reject_current()  # and on to the next open finding, outlined in white and zoomed to
    QApplication.processEvents()
    DOCS.mkdir(exist_ok=True)
    viewer.screenshot(str(DOCS / "review_findings.png"), canvas_only=False, flash=False)
    lesions = viewer.layers["MSLUB lesion mask"]
    lesions.visible = True
    # The axial slice with the most expert-marked lesion, the whole slice: the model's proposal
    # (yellow outlines) beside the expert's mask (magenta), where a reader compares them.
    busiest = int((lesions.data > 0).sum(axis=(1, 2)).argmax())
    viewer.reset_view()
    viewer.dims.set_point(0, lesions.translate[0] + busiest * lesions.scale[0])
    QApplication.processEvents()
    viewer.screenshot(str(DOCS / "review_against_reference.png"), canvas_only=False, flash=False)
    review.unsaved = False  # a demonstration: nothing to keep
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
