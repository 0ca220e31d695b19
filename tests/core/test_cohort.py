"""``brain-uad score … --out-dir``: cohorts of real IXI scans from a CSV, a folder, a BIDS dataset;
resumable, one broken scan reported and the rest done, several workers, torchrun over Gloo;
``brain-uad evaluate`` on a CSV and a BIDS dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad.cli import main
from napari_brain_uad.cohort_records import SUMMARY_COLUMNS, read_summary_csv, scan_outputs
from napari_brain_uad.scan_list import ScanEntry, read_scan_sources
from napari_brain_uad.typicality import TYPICALITY_LIMIT

# Healthy IXI T1 scans (120x120x90, 2 mm, skull on) with their brain masks: no brain extraction.
SUBJECTS = ("IXI012-HH-1211", "IXI013-HH-1212")
REPOSITORY = Path(__file__).resolve().parents[2]


def ixi(shared_data, subject):
    return shared_data / f"ixi_t1/{subject}_T1.nii.gz", shared_data / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz"


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary(folder):
    return {row["id"]: row for row in read_summary_csv(folder / "summary.csv")}


@pytest.fixture(scope="module")
def csv_cohort(shared_data, tmp_path_factory):
    """A CSV of two real scans with a corrupt .nii.gz between them, scored once."""
    folder = tmp_path_factory.mktemp("csv")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated gzip")
    rows = []
    for index, subject in enumerate(SUBJECTS):
        scan, brain = ixi(shared_data, subject)
        rows.append({"scan": str(scan), "brain_mask": str(brain), "id": f"s{index + 1}"})
        if index == 0:
            rows.append({"scan": "broken.nii.gz", "brain_mask": "", "id": ""})
    listing = write_csv(folder / "cohort.csv", rows)
    out = folder / "out"
    code = main(["score", str(listing), "--out-dir", str(out), "--quiet"])
    return listing, out, code


def test_a_broken_scan_fails_alone_and_the_exit_status_says_so(csv_cohort, shared_data, capsys):
    listing, out, code = csv_cohort
    assert code == 2
    rows = summary(out)
    assert list(rows) == ["s1", "broken", "s2"]  # the list's order
    assert rows["broken"]["status"] == "failed" and "broken.nii.gz" in rows["broken"]["error"]
    for scan_id in ("s1", "s2"):
        row = rows[scan_id]
        assert row["status"] == "done" and row["error"] == ""
        assert 1200 < row["brain_ml"] < 2000  # the brain masks given
        # healthy scans at the healthy threshold: a few small findings, far below 1 % of the brain
        assert 0 <= row["flagged_ml"] < 0.01 * row["brain_ml"] and row["findings"] >= 0
        assert row["largest_finding_ml"] <= row["flagged_ml"]
        assert row["typicality"] < TYPICALITY_LIMIT  # healthy scans of the training scanner: typical
    document = json.loads((out / "summary.json").read_text())
    assert document["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert document["columns"] == list(SUMMARY_COLUMNS) and len(document["scans"]) == 3
    assert document["model_sha256"] and document["settings"]["threshold_name"] == "healthy-99"


def test_outputs_are_named_after_the_id_and_on_the_scans_grid(csv_cohort, shared_data):
    _, out, _ = csv_cohort
    scan, brain = ixi(shared_data, SUBJECTS[0])
    source = nib.load(scan)
    for kind in ("anomaly_map", "reconstruction", "mask", "brain_mask"):
        written = nib.load(out / f"s1_{kind}.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "s1_brain_mask.nii.gz").dataobj) > 0,
                                  np.asarray(nib.load(brain).dataobj) > 0)
    record = json.loads((out / "s1_brain-uad.json").read_text())
    assert record["finished"] and record["match"]["scan_sha256"] and record["match"]["model_sha256"]
    # Voxels flagged in the mask add up to the summary's volume.
    voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000
    flagged = np.count_nonzero(np.asarray(nib.load(out / "s1_mask.nii.gz").dataobj)) * voxel_ml
    assert flagged == pytest.approx(summary(out)["s1"]["flagged_ml"], abs=1e-3)
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no temporary left


def test_the_cohort_map_is_the_single_scan_commands(csv_cohort, shared_data, tmp_path):
    """Every door gives the same map: one process scoring a cohort, and ``score SCAN --out-map``."""
    _, out, _ = csv_cohort
    scan, brain = ixi(shared_data, SUBJECTS[0])
    assert main(["score", str(scan), "--brain-mask", str(brain), "--out-map", str(tmp_path / "map.nii.gz"),
                 "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "map.nii.gz").dataobj),
                                  np.asarray(nib.load(out / "s1_anomaly_map.nii.gz").dataobj))


def test_a_rerun_skips_finished_scans_and_refuses_to_mix_settings(csv_cohort, capsys):
    listing, out, _ = csv_cohort
    mtimes = {path.name: path.stat().st_mtime_ns for path in out.glob("s[12]_*")}
    assert main(["score", str(listing), "--out-dir", str(out), "--quiet"]) == 2  # the broken scan again
    rows = summary(out)
    assert [rows[key]["status"] for key in ("s1", "broken", "s2")] == ["skipped", "failed", "skipped"]
    assert rows["s1"]["flagged_ml"] is not None  # the numbers come from the record
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("s[12]_*")} == mtimes  # nothing rewritten
    assert "1 of 3 scans failed" in capsys.readouterr().err
    # Another threshold would change the masks: refused without --overwrite, files untouched.
    assert main(["score", str(listing), "--out-dir", str(out), "--quiet", "--threshold", "0.3"]) == 2
    rows = summary(out)
    assert rows["s1"]["status"] == "failed" and "settings changed" in rows["s1"]["error"]
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("s[12]_*")} == mtimes


def test_overwrite_redoes_and_an_interrupted_scan_is_redone(shared_data, tmp_path):
    scan, brain = ixi(shared_data, SUBJECTS[0])
    listing = write_csv(tmp_path / "one.csv", [{"scan": str(scan), "brain_mask": str(brain), "id": "a"}])
    out = tmp_path / "out"
    # A run stopped half-way: an unfinished record and one output of it.
    out.mkdir()
    (out / "a_anomaly_map.nii.gz").write_bytes(b"partial")
    (out / "a_brain-uad.json").write_text(json.dumps({"software": {"name": "napari-brain-uad"}, "finished": False}))
    assert main(["score", str(listing), "--out-dir", str(out), "--quiet", "--threshold", "0.3"]) == 0
    assert summary(out)["a"]["status"] == "done"
    nib.load(out / "a_anomaly_map.nii.gz")  # whole again
    record = out / "a_brain-uad.json"
    before = record.stat().st_mtime_ns
    assert main(["score", str(listing), "--out-dir", str(out), "--quiet", "--threshold", "0.2", "--overwrite"]) == 0
    assert summary(out)["a"]["status"] == "done" and record.stat().st_mtime_ns > before
    assert json.loads(record.read_text())["match"]["settings"]["threshold"] == 0.2


def test_files_it_did_not_write_are_not_replaced(shared_data, tmp_path):
    scan, _ = ixi(shared_data, SUBJECTS[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine_anomaly_map.nii.gz").write_bytes(b"someone else's")
    listing = write_csv(tmp_path / "one.csv", [{"scan": str(scan), "brain_mask": "", "id": "mine"}])
    assert main(["score", str(listing), "--out-dir", str(out), "--quiet"]) == 2
    assert "not written by a cohort run" in summary(out)["mine"]["error"]
    assert (out / "mine_anomaly_map.nii.gz").read_bytes() == b"someone else's"


def test_a_folder_of_skull_stripped_scans_with_two_workers(shared_data, tmp_path):
    """A folder of scans (here skull-stripped with their expert masks, so the brain is their
    non-background voxels), two worker processes."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for subject in SUBJECTS:
        scan, brain = ixi(shared_data, subject)
        image = nib.load(scan)
        stripped = np.asarray(image.dataobj) * (np.asarray(nib.load(brain).dataobj) > 0)
        nib.save(nib.Nifti1Image(stripped.astype(np.float32), image.affine, image.header), scans / f"{subject}.nii.gz")
    out = tmp_path / "out"
    assert main(["score", str(scans), "--out-dir", str(out), "--workers", "2", "--quiet"]) == 0
    rows = summary(out)
    assert sorted(rows) == sorted(SUBJECTS) and {row["status"] for row in rows.values()} == {"done"}
    for subject in SUBJECTS:
        assert (out / f"{subject}_brain-uad.json").is_file() and (out / f"{subject}_mask.nii.gz").is_file()


def bids_dataset(shared_data, root, *, lesions=False):
    """A small BIDS tree of symlinks: sub-01 (no session) and sub-02/ses-1, masks in derivatives."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    for subject, prefix in zip(SUBJECTS, ("sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1")):
        scan, brain = ixi(shared_data, subject)
        image = root / f"{prefix}_T1w.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.symlink_to(scan)
        masks = root / "derivatives/masks" / f"{prefix}_desc-brain_mask.nii.gz"
        masks.parent.mkdir(parents=True, exist_ok=True)
        masks.symlink_to(brain)
        if lesions:
            write_lesion(brain, root / "derivatives/masks" / f"{prefix}_label-lesion_mask.nii.gz")
    return root


def write_lesion(brain_mask, path):
    """A synthetic 'lesion' label: a 10 mm cube in the middle of the brain (the evaluation
    reads it as truth; the scan is healthy, so the numbers are low but defined)."""
    image = nib.load(brain_mask)
    brain = np.asarray(image.dataobj) > 0
    centre = np.round(np.argwhere(brain).mean(axis=0)).astype(int)
    lesion = np.zeros(brain.shape, np.uint8)
    lesion[tuple(slice(c - 3, c + 3) for c in centre)] = 1
    nib.save(nib.Nifti1Image(lesion, image.affine, image.header), path)
    return path


def test_a_bids_dataset_gives_a_bids_derivatives_folder(shared_data, tmp_path):
    root = bids_dataset(shared_data, tmp_path / "bids")
    out = tmp_path / "derivatives_out"
    assert main(["score", str(root), "--out-dir", str(out), "--quiet"]) == 0
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "napari-brain-uad"
    for base in ("sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1"):
        for name in ("desc-anomaly_map.nii.gz", "desc-reconstruction_T1w.nii.gz", "desc-anomaly_mask.nii.gz",
                     "desc-brain_mask.nii.gz", "desc-anomaly_map.json"):
            assert (out / f"{base}_{name}").is_file(), f"{base}_{name}"
    assert {row["status"] for row in summary(out).values()} == {"done"}
    # The brain masks came from the derivatives (none was extracted) and the output folder,
    # read as derivatives itself, gives them back.
    record = json.loads((out / "sub-01/anat/sub-01_desc-anomaly_map.json").read_text())
    assert record["brain_mask"].endswith("sub-01_desc-brain_mask.nii.gz") and "given" in record["brain"]
    again = read_scan_sources([root], derivatives=out)
    assert all(out in entry.brain_mask.parents for entry in again)


def test_torchrun_shards_the_cohort_and_rank_0_merges(csv_cohort, tmp_path):
    listing, _, _ = csv_cohort
    out = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "napari_brain_uad.cli", "score", str(listing), "--out-dir", str(out)],
        capture_output=True, text=True, env=environment, timeout=300, cwd=REPOSITORY)
    assert result.returncode != 0, result.stderr  # the broken scan
    rows = summary(out)
    assert list(rows) == ["s1", "broken", "s2"]
    assert [rows[key]["status"] for key in ("s1", "broken", "s2")] == ["done", "failed", "done"]
    assert "rank 0:" in result.stderr and "rank 1:" in result.stderr  # both ranks scored
    assert "1 of 3 scans failed" in result.stderr
    assert not list(out.glob("summary.part-*"))  # merged, parts removed


def test_many_inputs_name_their_scans_and_refuse_clashing_ids(shared_data, tmp_path, capsys):
    scans = [ixi(shared_data, subject)[0] for subject in SUBJECTS]
    entries = read_scan_sources(scans)
    assert [entry.id for entry in entries] == [f"{subject}_T1" for subject in SUBJECTS]
    assert main(["score", str(scans[0]), str(scans[0]), "--out-dir", str(tmp_path / "o")]) == 2
    assert "two scans have the id" in capsys.readouterr().err  # the same scan twice
    assert main(["score", *map(str, scans), "--out-map", str(tmp_path / "m.nii.gz")]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert main(["score", *map(str, scans), "--out-dir", str(tmp_path / "o"), "--out-map", "m.nii.gz"]) == 2
    assert "drop --out-map" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_folder_per_patient_with_the_same_file_name_is_named_by_folder(shared_data, tmp_path):
    """`brain-uad score data/*/T1.nii.gz`, the most natural command, was refused ("two scans
    have the id 'T1'"): the scans are named by their folder when their file names agree."""
    scans = []
    for patient, subject in zip(("patient01", "patient02"), SUBJECTS):
        (tmp_path / "data" / patient).mkdir(parents=True)
        scans.append(tmp_path / "data" / patient / "T1.nii.gz")
        scans[-1].symlink_to(ixi(shared_data, subject)[0])
    entries = read_scan_sources(scans)
    assert [entry.id for entry in entries] == ["patient01_T1", "patient02_T1"]
    outputs = {scan_outputs(entry, tmp_path / "out", with_mask=True).files["anomaly_map"].name for entry in entries}
    assert outputs == {"patient01_T1_anomaly_map.nii.gz", "patient02_T1_anomaly_map.nii.gz"}


def test_two_scans_that_would_write_the_same_file_are_refused_before_any_work(shared_data, tmp_path, capsys):
    """A.nii.gz and A_brain.nii.gz both wrote A_brain_mask.nii.gz (A's brain, A_brain's mask),
    both reported done, and each re-run skipped both."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "A.nii.gz").symlink_to(ixi(shared_data, SUBJECTS[0])[0])
    (folder / "A_brain.nii.gz").symlink_to(ixi(shared_data, SUBJECTS[1])[0])
    assert main(["score", str(folder / "A.nii.gz"), str(folder / "A_brain.nii.gz"), "--out-dir", str(tmp_path / "o"),
                 "--threshold", "0.1"]) == 2
    error = capsys.readouterr().err
    assert "'A' and 'A_brain' would both write A_brain_mask.nii.gz" in error
    assert not any((tmp_path / "o").glob("*.nii.gz"))  # refused before any work
    # An output folder that is the scans' own: a second run would score the maps as scans.
    assert main(["score", str(folder), "--out-dir", str(folder)]) == 2
    assert "a later run would read the maps written there as scans" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["A.nii.gz", "A_brain.nii.gz"]


def test_bids_names_keep_every_entity_but_the_suffix(tmp_path):
    entry = ScanEntry("sub-01_ses-2_acq-mprage_run-1_T1w", Path("x.nii.gz"),
                      entities=(("sub", "01"), ("ses", "2"), ("acq", "mprage"), ("run", "1")))
    outputs = scan_outputs(entry, tmp_path, with_mask=False)
    folder = tmp_path / "sub-01/ses-2/anat"
    assert outputs.files["anomaly_map"] == folder / "sub-01_ses-2_acq-mprage_run-1_desc-anomaly_map.nii.gz"
    assert outputs.files["reconstruction"].name == "sub-01_ses-2_acq-mprage_run-1_desc-reconstruction_T1w.nii.gz"
    assert "mask" not in outputs.files and outputs.record.suffix == ".json"


# ---------------------------------------------------------------- evaluate


def test_evaluate_a_csv_and_a_bids_dataset(shared_data, tmp_path, capsys):
    scan, brain = ixi(shared_data, SUBJECTS[0])
    lesion = write_lesion(brain, tmp_path / "lesion.nii.gz")
    listing = write_csv(tmp_path / "cases.csv", [{"scan": str(scan), "brain_mask": str(brain),
                                                  "lesion_mask": str(lesion), "id": "case1"}])
    results = tmp_path / "results.json"
    assert main(["evaluate", str(listing), "--json", str(results), "--quiet"]) == 0
    assert "| case1 |" in capsys.readouterr().out
    row = json.loads(results.read_text())["cases"][0]
    assert row["case"] == "case1" and row["lesion_voxels"] > 100 and 0 <= row["auprc"] <= 1

    root = bids_dataset(shared_data, tmp_path / "bids", lesions=True)
    assert main(["evaluate", str(root), "--bids-filter", "sub=01", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| sub-01_T1w |" in out and "sub-02" not in out

    # A list without lesion masks is refused before any work, naming the scans.
    plain = write_csv(tmp_path / "plain.csv", [{"scan": str(scan), "id": "nolesion"}])
    assert main(["evaluate", str(plain)]) == 2
    error = capsys.readouterr().err
    assert "no lesion mask" in error and "nolesion" in error
    assert main(["evaluate", str(plain), "--images", str(scan), "--masks", str(lesion)]) == 2
    assert "not both" in capsys.readouterr().err


def test_one_run_at_a_time_writes_into_an_output_folder(shared_data, tmp_path, capsys):
    """Two cohort runs on one folder both reported done and mixed their masks; now the second is
    refused while the first runs, and a lock left by a run that died is taken over."""
    from napari_brain_uad.cohort import LOCK_FILE

    scan = ixi(shared_data, SUBJECTS[0])[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(str(os.getpid()))  # a run that is still going (this process)
    assert main(["score", str(scan), str(ixi(shared_data, SUBJECTS[1])[0]), "--out-dir", str(out)]) == 2
    assert "another brain-uad run" in capsys.readouterr().err
    assert not any(out.glob("*.nii.gz"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(dead.stdout.strip())  # a run that died without cleaning up
    assert main(["score", str(scan), str(ixi(shared_data, SUBJECTS[1])[0]), "--out-dir", str(out)]) == 0
    assert not (out / LOCK_FILE).exists() and any(out.glob("*_anomaly_map.nii.gz"))
