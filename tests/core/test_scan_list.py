"""Lists of scans: a folder, a CSV file and a BIDS dataset, built from real scans."""

from __future__ import annotations

import json

import pytest

from napari_brain_uad.scan_list import ScanListError, bids_entities, read_scan_list

SUBJECTS = ("IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236")


def _scan(shared_data, subject):
    return shared_data / "ixi_t1" / f"{subject}_T1.nii.gz"


def _brain(shared_data, subject):
    return shared_data / "ixi_t1" / "brainmask" / f"{subject}_brainmask.nii.gz"


def test_folder_lists_nifti_files_by_name(shared_data, tmp_path):
    for subject in reversed(SUBJECTS):
        (tmp_path / f"{subject}_T1.nii.gz").symlink_to(_scan(shared_data, subject))
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "brain-uad-session").mkdir()  # a session folder inside is not a scan
    entries = read_scan_list(tmp_path)
    assert [entry.id for entry in entries] == [f"{subject}_T1" for subject in SUBJECTS]
    assert all(entry.brain_mask is None and entry.lesion_mask is None for entry in entries)


def test_csv_paths_are_relative_to_the_csv(shared_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for subject in SUBJECTS[:2]:
        (data / f"{subject}.nii.gz").symlink_to(_scan(shared_data, subject))
        (data / f"{subject}_brain.nii.gz").symlink_to(_brain(shared_data, subject))
    listing = tmp_path / "lists" / "cohort.csv"
    listing.parent.mkdir()
    listing.write_text("id,scan,brain_mask,lesion_mask\n"
                       f"first,../data/{SUBJECTS[0]}.nii.gz,../data/{SUBJECTS[0]}_brain.nii.gz,\n"
                       "\n"
                       f",../data/{SUBJECTS[1]}.nii.gz,,\n")
    first, second = read_scan_list(listing)
    assert first.id == "first" and first.brain_mask == data / f"{SUBJECTS[0]}_brain.nii.gz"
    assert second.id == SUBJECTS[1] and second.brain_mask is None  # no id: the file's stem


def test_csv_mistakes_name_the_line(shared_data, tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text(f"scan\n{_scan(shared_data, SUBJECTS[0])}\nmissing.nii.gz\n")
    with pytest.raises(ScanListError, match=r"line 3: scan missing.nii.gz not found"):
        read_scan_list(listing)
    listing.write_text(f"image,id\n{_scan(shared_data, SUBJECTS[0])},a\n{_scan(shared_data, SUBJECTS[1])},a\n")
    with pytest.raises(ScanListError, match="two scans have the id 'a'"):
        read_scan_list(listing)
    long_id = "x" * 300  # an id names output files: refused at reading, not as an "internal error" at writing
    listing.write_text(f"image,id\n{_scan(shared_data, SUBJECTS[0])},{long_id}\n")
    with pytest.raises(ScanListError, match=r"is 300 bytes long; ids name output files, which take at most 200"):
        read_scan_list(listing)
    listing.write_text("path\nx.nii.gz\n")
    with pytest.raises(ScanListError, match="must name a 'scan' column"):
        read_scan_list(listing)


def test_bids_dataset_with_derivative_masks(shared_data, tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    layout = {("01", None): SUBJECTS[0], ("02", "1"): SUBJECTS[1], ("02", "2"): SUBJECTS[2]}
    for (subject, session), source in layout.items():
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        relative = f"sub-{subject}" + (f"/ses-{session}" if session else "") + "/anat"
        (tmp_path / relative).mkdir(parents=True)
        (tmp_path / relative / f"{prefix}_T1w.nii.gz").symlink_to(_scan(shared_data, source))
        (tmp_path / relative / f"{prefix}_FLAIR.nii.gz").symlink_to(_scan(shared_data, source))
        masks = tmp_path / "derivatives" / "masks" / relative
        masks.mkdir(parents=True)
        (masks / f"{prefix}_desc-brain_mask.nii.gz").symlink_to(_brain(shared_data, source))
    (tmp_path / "derivatives/masks/sub-01/anat/sub-01_label-lesion_mask.nii.gz").symlink_to(
        _brain(shared_data, SUBJECTS[0]))

    entries = read_scan_list(tmp_path)
    assert [entry.id for entry in entries] == ["sub-01_T1w", "sub-02_ses-1_T1w", "sub-02_ses-2_T1w"]
    assert all(entry.brain_mask is not None and entry.brain_mask.name.endswith("desc-brain_mask.nii.gz")
               for entry in entries)
    assert entries[0].lesion_mask.name == "sub-01_label-lesion_mask.nii.gz"
    assert entries[1].lesion_mask is None
    assert dict(entries[2].entities) == {"sub": "02", "ses": "2"}
    # Only the chosen suffix and entities.
    assert [entry.id for entry in read_scan_list(tmp_path, bids_suffix="FLAIR", bids_entities={"ses": "2"})] \
        == ["sub-02_ses-2_FLAIR"]
    with pytest.raises(ScanListError, match=r"holds no scans \(looked for .*_T2w"):
        read_scan_list(tmp_path, bids_suffix="T2w")


def test_bids_names():
    assert bids_entities("sub-01_ses-2_acq-mprage_T1w.nii.gz") == ({"sub": "01", "ses": "2", "acq": "mprage"}, "T1w")


def test_nothing_there_says_so(tmp_path):
    with pytest.raises(ScanListError, match="no such file or folder"):
        read_scan_list(tmp_path / "absent")
    with pytest.raises(ScanListError, match="holds no scans"):
        read_scan_list(tmp_path)
