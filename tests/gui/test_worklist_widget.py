"""The worklist in a real napari window (Xvfb): three real scans reviewed one after the other,
the viewer closed and opened again, every decision still there and no network run."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad.worklist import EXPORTED, NOT_RUN, REVIEWED, RUN

from conftest import IXI_THREE as SUBJECTS
WAIT_MS = 240_000


def _open_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    return viewer, widget


def _settled(widget, qtbot):
    """Wait for every worker of the worklist (restore, background run) to end."""
    panel = widget.worklist
    qtbot.waitUntil(lambda: widget._worker is None and not panel.busy,
                    timeout=WAIT_MS)


def _statuses(panel):
    return [panel.worklist.status(entry.id) for entry in panel.worklist.entries]


def _a_threshold_with_findings(widget):
    low, high = widget.threshold.min, widget.threshold.max
    for fraction in np.linspace(0.3, 0.9, 13):
        widget.threshold.value = low + fraction * (high - low)
        widget.review.refresh_table()
        if len(widget.review.findings) >= 2:
            return
    raise AssertionError("no threshold gives two findings to review")


def test_worklist_of_three_scans_survives_closing_and_reopening(make_napari_viewer, qtbot, ixi_worklist_csv, monkeypatch,
                                                                 tmp_path):
    viewer, widget = _open_viewer(make_napari_viewer)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    first, second, third = SUBJECTS
    assert panel.current == first and _statuses(panel) == [NOT_RUN] * 3
    assert widget.scan.value.name == first and widget.brain_mask.value.name == f"{first} brain"

    # Scan 1: run, then a threshold of the user's own, a finding accepted and a stroke painted.
    widget.run()
    _settled(widget, qtbot)  # the run, then the next scan analysed in the background
    assert _statuses(panel) == [RUN, RUN, NOT_RUN], widget.status.value
    _a_threshold_with_findings(widget)
    review = widget.review
    review.step(+1)
    review.accept_current()
    annotation = viewer.layers[f"{first} annotation"]
    annotation.paint((10, 60, 60), 1)  # a stroke of the user's own, far from the findings
    painted = annotation.data.copy()
    threshold_1 = widget.session.threshold
    decisions_1 = [(f.number, f.status) for f in review.findings]
    assert ("accepted" in dict(decisions_1).values())

    # Scan 2 opens from its background results (no Run); a finding rejected.
    panel.step(+1)
    _settled(widget, qtbot)
    assert f"{first} annotation" not in viewer.layers  # one scan at a time
    assert panel.current == second and widget.session is not None, widget.status.value
    assert "the network did not run" in widget.status.value
    _a_threshold_with_findings(widget)
    review.step(+1)
    review.reject_current()
    decisions_2 = [(f.number, f.status) for f in review.findings]
    threshold_2 = widget.session.threshold

    # Scan 3 was analysed in the background while scan 2 was reviewed: it too opens with results.
    panel.step(+1)
    _settled(widget, qtbot)
    assert panel.current == third and widget.session is not None
    assert _statuses(panel) == [REVIEWED, REVIEWED, RUN]
    viewer.close()

    # A new viewer: the worklist opens where the user was, every decision as it was, and
    # nothing runs the network.
    def refuse(*args, **kwargs):
        raise AssertionError("the network ran for a saved scan")

    monkeypatch.setattr("napari_brain_uad.models.load_model", refuse)
    viewer, widget = _open_viewer(make_napari_viewer)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    _settled(widget, qtbot)
    assert panel.current == third and _statuses(panel) == [REVIEWED, REVIEWED, RUN]
    panel.go_to(first)
    _settled(widget, qtbot)
    assert widget.session is not None, widget.status.value
    np.testing.assert_array_equal(viewer.layers[f"{first} annotation"].data, painted)
    assert widget.session.threshold == threshold_1 and widget.threshold.value == pytest.approx(threshold_1)
    assert [(f.number, f.status) for f in widget.review.findings] == decisions_1
    panel.step(+1)
    _settled(widget, qtbot)
    assert widget.session.threshold == threshold_2
    assert [(f.number, f.status) for f in widget.review.findings] == decisions_2
    assert not widget.review.unsaved  # all of it is in the session: closing need not ask

    # Exporting the scan's mask marks it exported; the file holds exactly the user's mask.
    written = widget.export_mask(tmp_path / "second.nii.gz")
    assert panel.worklist.status(second) == EXPORTED
    geometry = viewer.layers[second].metadata["nifti"]
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj),
                                  geometry.to_source(viewer.layers[f"{second} annotation"].data))


def test_opening_another_worklist_replaces_the_scan_in_view(make_napari_viewer, ixi_worklist_csv, shared_data,
                                                            tmp_path):
    viewer, widget = _open_viewer(make_napari_viewer)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    assert SUBJECTS[0] in viewer.layers and f"{SUBJECTS[0]} brain" in viewer.layers
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").symlink_to(shared_data / "ixi_t1" / "IXI661-HH-2788_T1.nii.gz")
    panel.open(bids)
    assert [layer.name for layer in viewer.layers] == ["sub-01_T1w"]  # one scan in view, the new list's
    assert panel.current == "sub-01_T1w" and widget.scan.value.name == "sub-01_T1w"
    assert "not run yet" in widget.status.value


def test_a_rerun_after_stale_results_keeps_the_users_saved_mask(make_napari_viewer, qtbot, ixi_worklist_csv):
    """The scan's file is rewritten (the same image, new bytes): its results are stale and the
    user is asked to Run; their saved mask is shown at once and survives the Run, saved."""
    import gzip

    viewer, widget = _open_viewer(make_napari_viewer)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    first = SUBJECTS[0]
    widget.run()
    _settled(widget, qtbot)
    annotation = viewer.layers[f"{first} annotation"]
    annotation.paint((10, 60, 60), 1)
    painted = annotation.data.copy()
    panel.save_now()
    path = panel.worklist.entry(first).scan
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))  # same image, new bytes
    panel.step(+1)
    _settled(widget, qtbot)
    panel.go_to(first)
    _settled(widget, qtbot)
    assert "cannot be used" in widget.status.value and "saved mask is shown" in widget.status.value
    np.testing.assert_array_equal(viewer.layers[f"{first} annotation"].data, painted)
    widget.run()
    _settled(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    np.testing.assert_array_equal(viewer.layers[f"{first} annotation"].data, painted)
    panel.save_now()
    geometry = viewer.layers[first].metadata["nifti"]
    saved = panel.worklist.saved_annotation(first, geometry.shape)
    np.testing.assert_array_equal(saved, geometry.to_source(painted))
    assert panel.worklist.status(first) == REVIEWED


def test_with_a_worklist_open_the_review_fits_a_1280_by_800_window(make_napari_viewer, qtbot, ixi_worklist_csv):
    """The reader's path in a small window: a list of three scans open and the first run, the
    findings table (its first rows) and the review buttons are on screen without scrolling; the
    scan and model fold themselves with a summary of what they hold, and the table's numbers
    read in one format (a small mean was drawn as 9.900e-02 beside 0.1102)."""
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    window = dock.window()
    window.resize(1280, 800)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    qtbot.wait(200)
    assert widget.setup_shown.value and widget.scan.native.isVisible()  # before any run: all to set up
    widget.run()
    _settled(widget, qtbot)
    _a_threshold_with_findings(widget)
    qtbot.wait(200)
    assert not widget.setup_shown.value and not widget.scan.native.isVisible()
    assert widget.setup_shown.text.startswith(f"Scan and model: {SUBJECTS[0]} · ")
    table = widget.review.table.native
    first_row = table.visualRect(table.model().index(0, 0))
    assert table.viewport().visibleRegion().contains(first_row.center()), "the first finding is off screen"
    for button in (widget.review.accept_button, widget.review.reject_button, widget.review.next_button):
        assert not button.native.visibleRegion().isEmpty(), f"{button.text} needs scrolling"
    assert panel.table.native.isVisible() and not panel.next_button.native.visibleRegion().isEmpty()
    delegate = table.itemDelegate()
    shown = [delegate.displayText(table.item(row, column).text(), table.locale())
             for row in range(table.rowCount()) for column in (2, 3, 4)]
    assert all(re.fullmatch(r"\d+\.\d{3,4}", text) for text in shown), shown
    # Unfolded on request, and the user's choice then holds over the next results.
    widget.setup_shown.value = True
    widget.run()
    _settled(widget, qtbot)
    qtbot.wait(100)
    assert widget.setup_shown.value and widget.scan.native.isVisible()


def test_moving_on_while_a_saved_session_is_being_shown_leaves_nothing_behind(make_napari_viewer, qtbot,
                                                                              ixi_worklist_csv):
    """A restored session shows a layer per turn of the event loop; Next or Previous pressed in
    between completes it on its own scan first: the scan left keeps its saved session, and none
    of its layers stays in the viewer of the next."""
    viewer, widget = _open_viewer(make_napari_viewer)
    panel = widget.worklist
    panel.open(ixi_worklist_csv)
    first, second, _ = SUBJECTS
    widget.run()
    _settled(widget, qtbot)  # the run, then the second scan analysed in the background
    panel.step(+1)
    qtbot.waitUntil(lambda: widget._display.pending, timeout=WAIT_MS)  # its session is being shown
    panel.step(-1)
    _settled(widget, qtbot)
    assert panel.current == first and "restored as you left it" in widget.status.value, widget.status.value
    assert not [layer.name for layer in viewer.layers if layer.name.startswith(second)]
    assert panel.worklist.status(second) == RUN  # its results stay saved, nothing was lost
    panel.step(+1)
    _settled(widget, qtbot)
    assert panel.current == second and widget.session is not None and "the network did not run" in widget.status.value
