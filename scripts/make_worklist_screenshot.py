"""A screenshot of the worklist for the documentation (docs/reading-scans.md): the real napari window with our dock.

Run under a display (``xvfb-run -a -s "-screen 0 1400x900x24"`` without one):
    NAPARI_BRAIN_UAD_DATA=../shared/data .venv/bin/python scripts/make_worklist_screenshot.py

It lists three held-out healthy IXI scans (skull on, with their brain masks) in a CSV in a
temporary folder, opens it as a worklist, runs the first scan with the bundled default model,
accepts its largest finding, waits for the second scan's background analysis, moves on to it
and saves docs/worklist.png: the second scan's results, opened from the background run, with
the statuses of all three in the list.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from make_review_screenshots import wait_for  # this folder is on the path when run as a script

REPOSITORY = Path(__file__).resolve().parents[1]
DOCS = REPOSITORY / "docs"
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))
SUBJECTS = ("IXI049-HH-1358", "IXI105-HH-1471", "IXI168-HH-1607")  # held out from every bundled model


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="worklist-"))
    listing = folder / "my-scans.csv"
    listing.write_text("id,scan,brain_mask\n" + "".join(
        f"{subject},{DATA}/ixi_t1/{subject}_T1.nii.gz,{DATA}/ixi_t1/brainmask/{subject}_brainmask.nii.gz\n"
        for subject in SUBJECTS))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    panel = widget.worklist
    panel.open(listing)
    widget.run()
    wait_for(lambda: widget.session is not None and not widget.running and not panel.busy)
    widget.review.step(+1)
    widget.review.accept_current()
    panel.step(+1)
    wait_for(lambda: widget.session is not None and not panel.busy)
    widget.review.step(+1)
    QApplication.processEvents()
    time.sleep(0.5)
    QApplication.processEvents()
    DOCS.mkdir(exist_ok=True)
    viewer.screenshot(str(DOCS / "worklist.png"), canvas_only=False, flash=False)
    widget.review.unsaved = False  # the picture is taken: closing must not ask
    viewer.close()
    print(f"wrote {DOCS / 'worklist.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
