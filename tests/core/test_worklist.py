"""The worklist's session on disk: saved as the user works, restored without the network,
refused when the scan changed, and never half-written (real IXI scans, bundled model)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_brain_uad import worklist as worklist_module
from napari_brain_uad.analysis_cache import StaleResults
from napari_brain_uad.nifti import ScanError
from napari_brain_uad.model_registry import default_model_name
from napari_brain_uad.worklist import EXPORTED, FAILED, NOT_RUN, REVIEWED, RUN, Worklist, model_file_sha256

from conftest import IXI_THREE as SUBJECTS


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network ran while restoring a saved session")

    monkeypatch.setattr("napari_brain_uad.models.load_model", refuse)
    monkeypatch.setattr("napari_brain_uad.analysis.reconstruct_volume_with_maps", refuse)


def test_session_survives_reopening_without_the_network(ixi_worklist_csv, monkeypatch):
    work = Worklist.open(ixi_worklist_csv)
    assert work.folder == ixi_worklist_csv.parent / "worklist.brain-uad-session"
    assert [work.status(entry.id) for entry in work.entries] == [NOT_RUN] * 3
    first = SUBJECTS[0]
    work.run(first, default_model_name())
    assert work.status(first) == RUN and work.next_to_run(first).id == SUBJECTS[1]

    # The user's review: a threshold of their own, one finding rejected, a stroke of their own.
    restored = work.restore(first)
    session, annotation = restored.session, restored.annotation
    session.set_threshold(float(np.percentile(session.analysis.filtered.values[session.analysis.filtered.region], 99)))
    findings = session.review(annotation)
    assert findings, "a 99th-percentile threshold leaves findings to review"
    session.reject(findings[0].number)
    annotation[60, 60, 45] = 1
    assert work.save_review(first, session, annotation)
    assert work.status(first) == REVIEWED
    work.set_current(first)

    _no_network(monkeypatch)
    again = Worklist.open(ixi_worklist_csv)
    assert again.current == first
    assert [again.status(entry.id) for entry in again.entries] == [REVIEWED, NOT_RUN, NOT_RUN]
    back = again.restore(first, model_sha256=model_file_sha256(default_model_name()))
    assert back.session.threshold == session.threshold and back.session.preset is None
    np.testing.assert_array_equal(back.annotation, annotation)
    np.testing.assert_array_equal(back.session.rejected, session.rejected)
    np.testing.assert_array_equal(back.session.analysis.anomaly_map, session.analysis.anomaly_map)
    np.testing.assert_array_equal(back.session.analysis.filtered.values, session.analysis.filtered.values)
    assert [f.status for f in back.session.review(back.annotation)] == [f.status for f in session.review(annotation)]
    assert again.restore(SUBJECTS[1]) is None  # never run: nothing to restore


def test_status_follows_exports_and_later_edits(ixi_worklist_csv):
    work = Worklist.open(ixi_worklist_csv)
    scan = SUBJECTS[0]
    work.run(scan, default_model_name())
    restored = work.restore(scan)
    work.save_review(scan, restored.session, restored.annotation)
    assert work.status(scan) == RUN  # nothing decided, nothing drawn: still just run
    restored.annotation[50, 50, 40] = 1
    work.save_review(scan, restored.session, restored.annotation)
    work.mark_exported(scan)
    assert work.status(scan) == EXPORTED
    assert not work.save_review(scan, restored.session, restored.annotation)  # the same review: still exported
    assert work.status(scan) == EXPORTED
    restored.annotation[50, 50, 41] = 1
    assert work.save_review(scan, restored.session, restored.annotation)
    assert work.status(scan) == REVIEWED  # an edit since the export


def test_changed_scan_is_not_given_old_results(ixi_worklist_csv):
    work = Worklist.open(ixi_worklist_csv)
    scan = SUBJECTS[0]
    work.run(scan, default_model_name())
    with pytest.raises(StaleResults, match="model file changed"):
        work.restore(scan, model_sha256="0" * 64)
    path = work.entry(scan).scan
    other = ixi_worklist_csv.parent / "data" / f"{SUBJECTS[1]}.nii.gz"
    shutil.copy(other, path)  # the file now holds another subject
    with pytest.raises(StaleResults, match="scan changed"):
        work.restore(scan)


def test_failed_scan_is_recorded_and_others_go_on(ixi_worklist_csv):
    broken = ixi_worklist_csv.parent / "data" / f"{SUBJECTS[1]}.nii.gz"
    broken.write_bytes(b"not a scan at all")
    work = Worklist.open(ixi_worklist_csv)
    with pytest.raises(ScanError):
        work.run(SUBJECTS[1], default_model_name())
    assert work.status(SUBJECTS[1]) == FAILED
    saved = json.loads((work.folder / "worklist.json").read_text())["scans"][SUBJECTS[1]]
    assert saved["status"] == FAILED and str(broken) in saved["error"]
    assert work.next_to_run(SUBJECTS[0]).id == SUBJECTS[2]  # a failed scan is not run again by itself


def _reviewed_first_scan(listing, voxel):
    """The list's first scan run and reviewed: ``voxel`` drawn by the user, in its saved mask."""
    work = Worklist.open(listing)
    scan = SUBJECTS[0]
    work.run(scan, default_model_name())
    restored = work.restore(scan)
    restored.annotation[voxel] = 1
    work.save_review(scan, restored.session, restored.annotation)
    return work, scan, restored


def test_crash_in_the_middle_of_a_save_leaves_the_previous_session(ixi_worklist_csv, monkeypatch):
    work, scan, restored = _reviewed_first_scan(ixi_worklist_csv, (60, 60, 45))
    saved_list = (work.folder / "worklist.json").read_text()

    real_savez = np.savez_compressed

    def crash_halfway(file, **arrays):
        real_savez(file, **arrays)
        with open(file, "r+b") as handle:
            handle.truncate(100)  # the file is half written when the machine goes down
        raise OSError("power cut")

    monkeypatch.setattr(np, "savez_compressed", crash_halfway)
    restored.annotation[61, 60, 45] = 1
    with pytest.raises(OSError, match="power cut"):
        work.save_review(scan, restored.session, restored.annotation)
    monkeypatch.undo()

    assert (work.folder / "worklist.json").read_text() == saved_list
    assert not [p for p in work.scan_folder(scan).iterdir() if p.name.startswith(".")]  # no temporary left
    back = Worklist.open(ixi_worklist_csv).restore(scan)
    assert back.annotation[60, 60, 45] == 1 and back.annotation[61, 60, 45] == 0  # the previous save, whole

    def crash_writing_json(self, text, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(worklist_module.Path, "write_text", crash_writing_json)
    with pytest.raises(OSError, match="disk full"):
        work.set_current(SUBJECTS[2])
    monkeypatch.undo()
    assert json.loads((work.folder / "worklist.json").read_text())["current"] is None


def test_bids_session_is_a_derivatives_dataset(shared_data, tmp_path):
    (tmp_path / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_T1w.nii.gz").symlink_to(shared_data / "ixi_t1" / f"{SUBJECTS[0]}_T1.nii.gz")
    work = Worklist.open(tmp_path)
    assert work.folder == tmp_path / "derivatives" / "napari-brain-uad"
    description = json.loads((work.folder / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert [entry.id for entry in Worklist.open(tmp_path).entries] == ["sub-01_T1w"]  # its own folder is not a scan


def test_scans_whose_ids_differ_only_in_odd_characters_never_share_a_session_folder(shared_data, tmp_path):
    """"scan 1" and "scan_1" used to share one folder: restoring one gave the other's results."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name, subject in (("scan 1.nii.gz", SUBJECTS[0]), ("scan_1.nii.gz", SUBJECTS[1]), ("Scan_1.nii.gz", SUBJECTS[2])):
        shutil.copy(shared_data / "ixi_t1" / f"{subject}_T1.nii.gz", folder / name)
    work = Worklist.open(folder)
    folders = {entry.id: work.scan_folder(entry.id) for entry in work.entries}
    assert len(folders) == 3
    assert len({str(path).lower() for path in folders.values()}) == 3  # apart on case-blind disks too
    assert sum(path.name.lower() == "scan_1" for path in folders.values()) == 1  # the first keeps the plain name
    again = Worklist.open(folder)  # the folders are remembered, not derived again
    assert {entry.id: again.scan_folder(entry.id) for entry in again.entries} == folders


def test_a_scan_whose_results_went_stale_still_gives_back_the_users_mask(ixi_worklist_csv):
    """Re-gzipping a reviewed scan makes its results stale; the user's mask must not be lost."""
    work, scan, restored = _reviewed_first_scan(ixi_worklist_csv, (50, 50, 40))
    shutil.copy(ixi_worklist_csv.parent / "data" / f"{SUBJECTS[1]}.nii.gz", work.entry(scan).scan)
    with pytest.raises(StaleResults):
        work.restore(scan)
    saved = work.saved_annotation(scan, restored.annotation.shape)
    np.testing.assert_array_equal(saved, restored.annotation)
    assert work.saved_annotation(scan, (4, 4, 4)) is None  # another grid: not this mask


@pytest.mark.parametrize("damage", ["truncated", "bytes overwritten"])
def test_damaged_saved_files_are_reported_and_the_review_kept_aside(ixi_worklist_csv, damage):
    """A results or review file damaged on disk (a full disk, a sync tool) is the file's fault:
    the user is told which file and what to do — never "internal error" — and an unreadable
    review is moved aside, not written over by the next save."""
    work, scan, restored = _reviewed_first_scan(ixi_worklist_csv, (50, 50, 40))

    def spoil(path):
        content = bytearray(path.read_bytes())
        if damage == "truncated":
            path.write_bytes(bytes(content[: len(content) // 2]))
        else:
            middle = len(content) // 2
            content[middle:middle + 200] = b"\0" * 200
            path.write_bytes(bytes(content))

    review = work.review_path(scan)
    original = review.read_bytes()
    spoil(review)
    damaged = review.read_bytes()
    with pytest.raises(StaleResults, match=r"review\.npz: the saved review cannot be read .*kept as review\.damaged-"):
        work.restore(scan)
    kept = list(review.parent.glob("review.damaged-*.npz"))
    assert not review.exists() and len(kept) == 1 and kept[0].read_bytes() == damaged != original

    spoil(work.results_path(scan))
    with pytest.raises(StaleResults, match=r"results\.npz: the saved results cannot be read"):
        work.restore(scan)
