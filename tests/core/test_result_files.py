"""A scan's result files as users meet them (``results``, ``cohort_records``): a user's own
summary in the output folder, a run killed between writing its two summaries, two outputs given
one file name, an output over the scan, a read-only output folder — each refused before any
analysis, or left consistent; and every door writes the same files under the same names."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad.cli import main
from napari_brain_uad.cohort_records import read_summary_csv

from conftest import SHARED_DATA

MSLUB_T1 = SHARED_DATA / "mslub/patient26/T1.nii.gz"


def write_nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), path)
    return path


def small_scan(path):
    return write_nifti(path, np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))


@pytest.fixture
def no_analysis(monkeypatch):
    """Every check here must come before the analysis: should one run, the test fails."""
    from napari_brain_uad import analysis

    def refuse(*args, **kwargs):
        raise AssertionError("the analysis ran")

    monkeypatch.setattr(analysis, "analyse_scan", refuse)


# ------------------------------------------------------------------------------ the summaries

@pytest.mark.parametrize("name, content", [("summary.csv", "patient,my notes\n1,keep me\n"),
                                           ("summary.json", '{"my": "own summary"}\n')])
def test_a_users_own_summary_in_the_output_folder_is_not_replaced(name, content, tmp_path, no_analysis, capsys):
    """A user's summary.csv (or .json) in --out-dir was replaced by the run's without a word."""
    scan = small_scan(tmp_path / "T1.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text(content)
    assert main(["score", str(scan), "--out-dir", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{out / name}: already exists and was not written by" in error and "--overwrite" in error
    assert (out / name).read_text() == content
    assert sorted(path.name for path in out.iterdir()) == [name]  # refused before anything was written


def test_a_kill_between_the_two_summaries_leaves_them_agreeing(tmp_path, monkeypatch, capsys):
    """A run killed between renaming summary.csv and summary.json left one with the last run's
    rows and the other with this run's. Now the JSON names its CSV by hash: reading the summary
    rebuilds the CSV, and the next run takes the folder as its own."""
    from napari_brain_uad.cohort_records import read_summary

    scans = [tmp_path / "scans" / f"{name}.nii.gz" for name in ("a", "b")]
    scans[0].parent.mkdir()
    for scan in scans:
        scan.write_bytes(b"\x1f\x8b\x08 truncated gzip")  # fails fast, before any network: a failed row
    out = tmp_path / "out"
    assert main(["score", str(scans[0]), "--out-dir", str(out), "--quiet"]) == 2  # a first run: one row

    replace, renamed = os.replace, []

    def killed_between_the_summaries(source, target):
        if os.path.basename(target) in ("summary.csv", "summary.json"):
            renamed.append(os.path.basename(target))
            if len(renamed) == 2:
                raise KeyboardInterrupt  # the process dies here: the second summary is not renamed
        return replace(source, target)

    monkeypatch.setattr(os, "replace", killed_between_the_summaries)
    with pytest.raises(KeyboardInterrupt):
        main(["score", *map(str, scans), "--out-dir", str(out), "--quiet"])  # a second run: two rows
    monkeypatch.setattr(os, "replace", replace)

    document = read_summary(out)
    ids = [row["id"] for row in document["scans"]]
    assert ids == [row["id"] for row in read_summary_csv(out / "summary.csv")]  # the two agree
    assert ids == ["a", "b"] and document["counts"]["failed"] == 2  # the last run's whole summary

    # Killed again before either rename, then run again: the previous CSV is known for ours.
    monkeypatch.setattr(os, "replace", killed_between_the_summaries)
    renamed[:] = ["already one"]
    with pytest.raises(KeyboardInterrupt):
        main(["score", str(scans[0]), "--out-dir", str(out), "--quiet"])
    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    assert main(["score", *map(str, scans), "--out-dir", str(out), "--quiet"]) == 2
    assert "not written by" not in capsys.readouterr().err
    assert [row["id"] for row in read_summary_csv(out / "summary.csv")] == ["a", "b"]
    assert [row["id"] for row in json.loads((out / "summary.json").read_text())["scans"]] == ["a", "b"]


# ------------------------------------------------------------------------------ one scan's outputs

def test_two_outputs_in_one_file_are_refused_at_once(tmp_path, no_analysis, capsys):
    """``--out-map X --out-mask X`` failed only after the whole analysis."""
    scan = small_scan(tmp_path / "T1.nii.gz")
    same = tmp_path / "result.nii.gz"
    assert main(["score", str(scan), "--out-map", str(same), "--out-mask", str(same), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{same}: given for both the anomaly map and the mask" in error and "internal error" not in error
    assert not same.exists()


def test_an_output_over_the_scan_or_its_brain_mask_is_refused_even_with_overwrite(tmp_path, no_analysis, capsys):
    scan = small_scan(tmp_path / "T1.nii.gz")
    brain = write_nifti(tmp_path / "brain.nii.gz", np.ones((16, 16, 16), np.uint8))
    before = scan.read_bytes(), brain.read_bytes()
    assert main(["score", str(scan), "--out-recon", str(scan), "--overwrite", "--quiet"]) == 2
    assert f"{scan}: the reconstruction would replace the input" in capsys.readouterr().err
    assert main(["score", str(scan), "--brain-mask", str(brain), "--out-map", str(tmp_path / "map.nii.gz"),
                 "--out-brain-mask", str(tmp_path / "." / "brain.nii.gz"), "--overwrite", "--quiet"]) == 2
    assert "the brain mask would replace the input" in capsys.readouterr().err
    assert (scan.read_bytes(), brain.read_bytes()) == before


needs_a_user = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                  reason="root writes into read-only folders: the refusal cannot be seen as root")


@needs_a_user
@pytest.mark.parametrize("where", ["folder", "folder/new"])
def test_a_read_only_output_folder_is_the_users_to_fix_and_said_before_the_analysis(where, tmp_path, no_analysis,
                                                                                     capsys):
    """A read-only folder was "internal error … a bug", after the whole analysis."""
    scan = small_scan(tmp_path / "T1.nii.gz")
    read_only = tmp_path / "folder"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        target = tmp_path / where
        assert main(["score", str(scan), "--out-map", str(target / "map.nii.gz"), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert f"{target}: cannot write into this folder" in error and "internal error" not in error
        assert main(["score", str(scan), "--out-dir", str(target), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert f"{target}: cannot write into this folder" in error and "internal error" not in error
        assert not any(read_only.iterdir())
    finally:
        read_only.chmod(0o755)


# ------------------------------------------------------------------------------ every door, the same files

def test_the_cohort_writes_the_spread_as_the_widget_export_names_it(small_ddpm_checkpoint, tmp_path):
    """The cohort skipped the spread and the model's extra maps that the widget exports; now
    both write every map, under one rule for names, and a re-run still skips the scan."""
    from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
    from napari_brain_uad.scan_reader import read_scan
    from napari_brain_uad.models import load_model
    from napari_brain_uad.results import export_outputs, write_results

    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / "T1.nii.gz"
    scan.symlink_to(MSLUB_T1)
    out = tmp_path / "out"
    arguments = ["score", str(scan), "--out-dir", str(out), "--model", str(small_ddpm_checkpoint), "--scorer", "residual",
                 "--samples", "2", "--quiet"]
    assert main(arguments) == 0
    record = json.loads((out / "T1_brain-uad.json").read_text())
    assert record["outputs"]["spread"] == "T1_spread.nii.gz" and (out / "T1_spread.nii.gz").is_file()

    analysis = analyse_scan(read_scan(scan), load_model(small_ddpm_checkpoint)[0],
                            settings=AnalysisSettings(scorer="residual", samples=2, device="cpu"))
    exported = write_results(analysis, export_outputs(analysis, tmp_path / "export").files)
    assert sorted(path.name for path in exported) == ["T1_anomaly_map.nii.gz", "T1_reconstruction.nii.gz",
                                                      "T1_spread.nii.gz"]
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "export/T1_spread.nii.gz").dataobj),
                               np.asarray(nib.load(out / "T1_spread.nii.gz").dataobj), rtol=1e-5, atol=1e-6)

    assert main(arguments) == 0
    assert read_summary_csv(out / "summary.csv")[0]["status"] == "skipped"


def test_a_summary_of_an_earlier_version_is_still_ours(tmp_path):
    """Summaries written before the JSON carried the CSV's hash: our JSON beside a CSV with our
    header is ours (a folder scored by an earlier version resumes); another CSV is not."""
    from napari_brain_uad.cohort_records import SOFTWARE, SUMMARY_COLUMNS, check_run_files
    from napari_brain_uad.errors import OutputExists

    (tmp_path / "summary.json").write_text(json.dumps({"software": SOFTWARE, "scans": []}))
    (tmp_path / "summary.csv").write_text(",".join(SUMMARY_COLUMNS) + "\n")
    check_run_files(tmp_path, overwrite=False)
    (tmp_path / "summary.csv").write_text("patient,volume\n")
    with pytest.raises(OutputExists, match="summary.csv"):
        check_run_files(tmp_path, overwrite=False)
    check_run_files(tmp_path, overwrite=True)


def test_the_result_and_cohort_modules_are_in_no_import_cycle():
    """results, cohort_records and cohort import downwards only (every import, also those inside
    functions, read from the source)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "src" / "napari_brain_uad"
    imports = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module] if node.module else [alias.name for alias in node.names])
        imports[path.stem] = {name.split(".")[0] for name in found}
    for start in ("results", "cohort_records", "cohort"):
        seen, todo = set(), list(imports[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                todo.extend(imports.get(module, ()))
