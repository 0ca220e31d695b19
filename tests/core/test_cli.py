"""``brain-uad`` on real scans: outputs on the input's grid, and every bad input refused in one line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad.cli import main
from napari_brain_uad.models import DDPM, DDPMConfig, load_model, save_model
from napari_brain_uad.metrics import auprc

from conftest import SHARED_DATA

MSLUB_T1 = SHARED_DATA / "mslub/patient26/T1.nii.gz"


@pytest.fixture(scope="module")
def mslub_outputs(small_ddpm_checkpoint, tmp_path_factory):
    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("out")
    code = main(["score", str(MSLUB_T1), "--model", str(small_ddpm_checkpoint), "--scorer", "residual", "--quiet",
                 "--out-map", str(folder / "map.nii.gz"), "--out-recon", str(folder / "recon.nii.gz"),
                 "--out-mask", str(folder / "mask.nii.gz"), "--threshold", "healthy-99"])
    assert code == 0
    return folder


def test_every_output_is_on_the_inputs_grid_with_its_affine(mslub_outputs):
    source = nib.load(MSLUB_T1)
    for name in ("map", "recon", "mask"):
        written = nib.load(mslub_outputs / f"{name}.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
    brain = np.asarray(source.dataobj) != 0
    score_map = np.asarray(nib.load(mslub_outputs / "map.nii.gz").dataobj)
    assert not score_map[~brain].any() and score_map[brain].max() > 0  # scores only inside the brain
    mask = np.asarray(nib.load(mslub_outputs / "mask.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1} and not mask[~brain].any()


def test_outputs_are_never_replaced_silently(mslub_outputs, small_ddpm_checkpoint, capsys):
    before = (mslub_outputs / "map.nii.gz").read_bytes()
    code = main(["score", str(MSLUB_T1), "--model", str(small_ddpm_checkpoint), "--out-map", str(mslub_outputs / "map.nii.gz")])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (mslub_outputs / "map.nii.gz").read_bytes() == before


def test_models_prints_the_card(small_ddpm_checkpoint, capsys):
    assert main(["models", str(small_ddpm_checkpoint)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["kind"] == "ddpm" and card["thresholds"]["healthy-99"]["value"] == 0.05


def write_bytes(path, content):
    path.write_bytes(content)
    return path


def write_nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.nii.gz", "file not found"),
        (lambda d: write_bytes(d / "text.nii.gz", gzip.compress(b"not an image")), "text.nii.gz"),
        (lambda d: write_nifti(d / "flat.nii.gz", np.ones((32, 32), np.float32)), "flat.nii.gz"),
        (lambda d: write_nifti(d / "zeros.nii.gz", np.zeros((16, 16, 16), np.float32)), "zeros.nii.gz"),
        (lambda d: write_nifti(d / "nan.nii.gz", np.full((16, 16, 16), np.nan, np.float32)), "nan.nii.gz"),
    ],
)
def test_bad_inputs_give_one_line_and_no_output(make_input, message, small_ddpm_checkpoint, tmp_path, capsys):
    scan = make_input(tmp_path)
    out = tmp_path / "map.nii.gz"
    code = main(["score", str(scan), "--model", str(small_ddpm_checkpoint), "--out-map", str(out), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2, error
    lines = [line for line in error.splitlines() if line.startswith("brain-uad: error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in error
    assert not out.exists() and not list(tmp_path.glob(".map*"))


def test_a_brain_mask_of_another_grid_is_refused(small_ddpm_checkpoint, tmp_path, capsys):
    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    other = write_nifti(tmp_path / "mask.nii.gz", np.ones((20, 20, 20), np.uint8))
    code = main(["score", str(MSLUB_T1), "--model", str(small_ddpm_checkpoint), "--brain-mask", str(other),
                 "--out-map", str(tmp_path / "map.nii.gz"), "--quiet"])
    assert code == 2 and "grid" in capsys.readouterr().err
    assert not (tmp_path / "map.nii.gz").exists()


def test_usage_errors_are_refused_before_any_work(small_ddpm_checkpoint, tmp_path, capsys):
    assert main(["score", str(MSLUB_T1), "--model", str(small_ddpm_checkpoint)]) == 2
    assert "nothing to write" in capsys.readouterr().err
    bare = save_model(tmp_path / "bare.safetensors", load_model(small_ddpm_checkpoint)[0])  # no stored threshold
    assert main(["score", str(MSLUB_T1), "--model", str(bare), "--out-mask", str(tmp_path / "m.nii.gz")]) == 2
    assert "needs --threshold" in capsys.readouterr().err
    assert main(["score", str(MSLUB_T1), "--model", str(small_ddpm_checkpoint), "--out-mask", str(tmp_path / "m.nii.gz"),
                 "--threshold", "nonsense"]) == 2
    assert "healthy-99" in capsys.readouterr().err
    assert main(["score", str(MSLUB_T1), "--model", str(tmp_path / "none.safetensors"),
                 "--out-map", str(tmp_path / "m.nii.gz")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["score", str(MSLUB_T1), "--model", "no-such-model", "--out-map", str(tmp_path / "m.nii.gz")]) == 2
    assert "not a model name" in capsys.readouterr().err


def test_a_threshold_calibrated_for_another_scorer_is_refused(tmp_path, capsys):
    thresholds = {"healthy-99": {"value": 0.2, "scorer": "ssim-ens"}}
    model = save_model(tmp_path / "calibrated.safetensors", DDPM(DDPMConfig(channels=(8, 8, 8), norm_num_groups=4,
                                                                            num_head_channels=8)),
                       {"thresholds": thresholds})
    code = main(["score", str(MSLUB_T1), "--model", str(model), "--scorer", "residual",
                 "--out-mask", str(tmp_path / "m.nii.gz"), "--threshold", "healthy-99"])
    assert code == 2 and "calibrated for scorer ssim-ens" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def default_outputs(tmp_path_factory):
    """`brain-uad score` with nothing but the input and the outputs: the bundled model decides."""
    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("default")
    code = main(["score", str(MSLUB_T1), "--out-map", str(folder / "map.nii.gz"),
                 "--out-mask", str(folder / "mask.nii.gz"), "--quiet"])
    assert code == 0
    return folder


def test_the_bundled_model_gives_a_sensible_map_of_the_ms_patient(default_outputs):
    lesions = np.asarray(nib.load(SHARED_DATA / "mslub/patient26/lesionmask.nii.gz").dataobj) > 0
    brain = np.asarray(nib.load(MSLUB_T1).dataobj) != 0
    score_map = np.asarray(nib.load(default_outputs / "map.nii.gz").dataobj)
    assert score_map.shape == lesions.shape
    # The map points at the expert's lesions: they score higher than the rest of the brain, and
    # ranking the brain's voxels by score finds them far better than chance (the lesions'
    # share of the brain). Measured with the bundled N4 DAE: 1.26x and 3.9x.
    assert score_map[lesions & brain].mean() > 1.15 * score_map[brain & ~lesions].mean()
    assert auprc(score_map, lesions, brain) > 3 * lesions[brain].mean()
    mask = np.asarray(nib.load(default_outputs / "mask.nii.gz").dataobj) > 0
    # The default (healthy-percentile) mask flags lesion voxels far more often than the rest of
    # the brain, and stays a small share of this brain although the scan comes from another
    # scanner than the training scans (measured: 10 % of the lesion voxels, 2.0 % of the brain;
    # 24 % and 13 % before the models removed the bias field).
    assert mask[lesions].mean() > 3 * mask[brain & ~lesions].mean()
    assert 0 < mask.sum() < 0.05 * brain.sum()


def test_models_lists_the_bundled_default_with_its_card(capsys):
    assert main(["models"]) == 0
    cards = json.loads(capsys.readouterr().out)
    default = next(card for card in cards if card["default"])
    assert default["source"] == "bundled" and default["model_space"]["modality"] == "T1"
    assert default["thresholds"] and default["training_command"].startswith("brain-uad-train")


# ---------------------------------------------------------------- evaluate


def test_evaluate_prints_and_writes_the_papers_metrics(small_ddpm_checkpoint, tmp_path, capsys):
    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    results = tmp_path / "results.json"
    code = main(["evaluate", "--model", str(small_ddpm_checkpoint), "--scorer", "residual", "--images", str(MSLUB_T1),
                 "--masks", str(SHARED_DATA / "mslub/patient26/lesionmask.nii.gz"), "--threshold", "0.05",
                 "--json", str(results), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "| T1.nii.gz |" in out and "pooled" in out
    document = json.loads(results.read_text())
    row = document["cases"][0]
    assert row["lesion_voxels"] > 1000
    for key in ("best_dice", "dice", "auprc"):
        assert 0.0 <= row[key] <= 1.0
    assert row["best_dice"] >= row["dice"]  # the best threshold is at least as good as any one
    assert document["pooled"]["auprc"] == pytest.approx(row["auprc"])  # one case: pooled = per case
    assert row["l1_ratio"] > 0
    # Never over an existing file.
    assert main(["evaluate", "--model", str(small_ddpm_checkpoint), "--images", str(MSLUB_T1), "--masks",
                 str(SHARED_DATA / "mslub/patient26/lesionmask.nii.gz"), "--json", str(results), "--quiet"]) == 2


def test_evaluate_refuses_mismatched_inputs(small_ddpm_checkpoint, tmp_path, capsys):
    if not MSLUB_T1.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    assert main(["evaluate", "--model", str(small_ddpm_checkpoint), "--images", str(MSLUB_T1), str(MSLUB_T1),
                 "--masks", str(MSLUB_T1)]) == 2
    assert "one lesion mask per image" in capsys.readouterr().err
    other = write_nifti(tmp_path / "lesions.nii.gz", np.ones((20, 20, 20), np.uint8))
    assert main(["evaluate", "--model", str(small_ddpm_checkpoint), "--images", str(MSLUB_T1), "--masks", str(other),
                 "--quiet"]) == 2
    assert "not on the grid" in capsys.readouterr().err


def test_the_installed_command_runs():
    result = subprocess.run([sys.executable, "-m", "napari_brain_uad.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "score" in result.stdout


# ---------------------------------------------------------------- raw scans, skull on


def _score(scan, folder, *extra) -> dict:
    outputs = {name: folder / f"{name}.nii.gz" for name in ("map", "mask", "brain")}
    assert main(["score", str(scan), "--out-map", str(outputs["map"]), "--out-mask", str(outputs["mask"]),
                 "--out-brain-mask", str(outputs["brain"]), "--quiet", *extra]) == 0
    return {name: np.asarray(nib.load(path).dataobj) for name, path in outputs.items()}


def test_a_raw_scan_needs_nothing_but_itself(shared_data, tmp_path):
    """A held-out healthy IXI T1 with its skull on, and nothing else: the brain is extracted
    (written with --out-brain-mask), and the flagged volume is what the expert brain mask gives,
    not hundreds of mL of skull and scalp."""
    subject = "IXI105-HH-1471"
    scan = shared_data / f"ixi_t1/{subject}_T1.nii.gz"
    reference = shared_data / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz"
    (tmp_path / "raw").mkdir()
    (tmp_path / "masked").mkdir()
    raw = _score(scan, tmp_path / "raw")
    masked = _score(scan, tmp_path / "masked", "--brain-mask", str(reference))
    truth = np.asarray(nib.load(reference).dataobj) > 0
    brain = raw["brain"] > 0
    assert 2 * np.count_nonzero(brain & truth) / (brain.sum() + truth.sum()) >= 0.93
    np.testing.assert_array_equal(masked["brain"] > 0, truth)
    voxel_ml = float(np.prod(nib.load(scan).header.get_zooms()[:3])) / 1000
    flagged_raw, flagged_masked = (np.count_nonzero(out["mask"]) * voxel_ml for out in (raw, masked))
    assert abs(flagged_raw - flagged_masked) <= 0.02 * truth.sum() * voxel_ml
    assert not raw["map"][~brain].any()  # nothing scored outside the brain: no skull, no scalp


def test_a_raw_clinical_scan_with_thick_slices(shared_data, tmp_path):
    """An MS patient's clinical T1 as acquired (skull on, 3 mm slices, scanner intensities)."""
    scan = shared_data / "mslub_longitudinal_raw/patient01/T1W.nii.gz"
    out = _score(scan, tmp_path)
    brain = out["brain"] > 0
    voxel_ml = float(np.prod(nib.load(scan).header.get_zooms()[:3])) / 1000
    assert 1100 < brain.sum() * voxel_ml < 1700
    assert out["map"].shape == brain.shape and not out["map"][~brain].any()
    assert np.count_nonzero(out["mask"]) < 0.1 * brain.sum()  # a few findings, not the whole brain


def test_lesion_direction_uses_the_one_way_residual_and_its_threshold(shared_data, tmp_path, capsys):
    scan = shared_data / "ixi_t1" / "IXI661-HH-2788_T1.nii.gz"
    brain = shared_data / "ixi_t1" / "brainmask" / "IXI661-HH-2788_brainmask.nii.gz"
    assert main(["score", str(scan), "--brain-mask", str(brain), "--lesion-direction",
                 "--out-mask", str(tmp_path / "mask.nii.gz"), "--out-map", str(tmp_path / "map.nii.gz")]) == 0
    # The default model's own scorer is the one-way residual (chosen on real lesions): its healthy-99.
    assert "at threshold healthy-99 = " in capsys.readouterr().err
    darker = nib.load(tmp_path / "map.nii.gz").get_fdata()
    assert main(["score", str(scan), "--brain-mask", str(brain), "--scorer", "residual", "--out-map",
                 str(tmp_path / "both.nii.gz"), "--out-mask", str(tmp_path / "both_mask.nii.gz")]) == 0
    assert "at threshold healthy-99-residual = " in capsys.readouterr().err  # the two-way residual's own
    both = nib.load(tmp_path / "both.nii.gz").get_fdata()
    inside = both > 0
    # Counting one way only: never more than both ways, and zero wherever the scan is brighter.
    assert (darker <= both + 1e-6).all() and (darker[inside] == 0).mean() > 0.2
    assert main(["score", str(scan), "--lesion-direction", "--scorer", "ssim", "--out-map",
                 str(tmp_path / "x.nii.gz")]) == 2
    assert "--lesion-direction means --scorer residual-dark" in capsys.readouterr().err


# ---------------------------------------------------------------- the model for the scan's contrast


@pytest.fixture
def loaded_models(monkeypatch):
    """The checkpoint files the command loads, in order. The analysis stops with a settings
    error right after the model is loaded, so no network runs: these tests are about which model."""
    from pathlib import Path

    from napari_brain_uad import analysis, evaluation, models
    from napari_brain_uad.errors import SettingsError

    loaded = []
    load = models.load_model

    def recording(path, *args, **kwargs):
        loaded.append(Path(path))
        return load(path, *args, **kwargs)

    def stop(*args, **kwargs):
        raise SettingsError("stopped before the network ran")

    monkeypatch.setattr(models, "load_model", recording)
    monkeypatch.setattr(analysis, "analyse_scan", stop)
    monkeypatch.setattr(evaluation, "analyse_scan", stop)
    return loaded


def small_scan(path):
    return write_nifti(path, np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))


def test_score_picks_the_model_of_the_scans_contrast_and_says_so(flair_model, loaded_models, tmp_path, capsys):
    from napari_brain_uad.model_registry import resolve_model

    scan = small_scan(tmp_path / "sub-01_FLAIR.nii.gz")
    code = main(["score", str(scan), "--out-map", str(tmp_path / "map.nii.gz"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and "stopped before the network ran" in error
    assert "brain-uad: FLAIR scan: using flair-test (picked by contrast; --model NAME|PATH picks another)" in error
    assert loaded_models == [resolve_model(flair_model)]

    t1 = small_scan(tmp_path / "T1W.nii.gz")
    assert main(["score", str(t1), "--out-map", str(tmp_path / "map.nii.gz"), "--quiet"]) == 2
    assert "T1 scan: using ixi-t1-dae-n4 (picked by contrast" in capsys.readouterr().err
    assert loaded_models[-1] == resolve_model("ixi-t1-dae-n4")


def test_a_model_the_user_names_always_wins(flair_model, loaded_models, tmp_path, capsys):
    from napari_brain_uad.model_registry import resolve_model

    scan = small_scan(tmp_path / "sub-01_FLAIR.nii.gz")
    assert main(["score", str(scan), "--model", "ixi-t1-dae-n4", "--out-map", str(tmp_path / "map.nii.gz"),
                 "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "picked by contrast" not in error
    assert "looks like FLAIR but the model was trained on T1" in error  # the user's choice, warned about
    assert loaded_models == [resolve_model("ixi-t1-dae-n4")]


def test_each_scan_of_a_cohort_gets_its_own_contrasts_model(flair_model, loaded_models, tmp_path, capsys):
    from napari_brain_uad.cohort_records import read_summary_csv
    from napari_brain_uad.model_registry import resolve_model

    scans = [small_scan(tmp_path / name) for name in ("a_FLAIR.nii.gz", "b_T1.nii.gz", "c_t2f.nii.gz")]
    out = tmp_path / "out"
    code = main(["score", *map(str, scans), "--out-dir", str(out), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2  # every scan stopped before the network
    assert "brain-uad: 2 FLAIR scans: using flair-test (picked by contrast" in error
    assert "brain-uad: T1 scan: using ixi-t1-dae-n4 (picked by contrast" in error
    rows = read_summary_csv(out / "summary.csv")
    assert [row["model"] for row in rows] == ["flair-test", "ixi-t1-dae-n4", "flair-test"]
    assert all("stopped before the network ran" in row["error"] for row in rows)
    assert sorted(loaded_models) == sorted([resolve_model(flair_model), resolve_model("ixi-t1-dae-n4")])  # once each
    document = json.loads((out / "summary.json").read_text())
    assert [model["model"] for model in document["models"]] == ["flair-test", "ixi-t1-dae-n4"]

    # --model: one model for every scan, whatever their contrast.
    again = tmp_path / "again"
    assert main(["score", *map(str, scans), "--out-dir", str(again), "--model", "ixi-t1-dae", "--quiet"]) == 2
    assert "picked by contrast" not in capsys.readouterr().err
    assert {row["model"] for row in read_summary_csv(again / "summary.csv")} == {"ixi-t1-dae"}


def test_cohort_workers_load_each_scans_model(flair_model, loaded_models, tmp_path, monkeypatch):
    """What a worker process does with a scan, here in this process: its own job's model."""
    from napari_brain_uad import cohort
    from napari_brain_uad.analysis import AnalysisSettings
    from napari_brain_uad.model_registry import resolve_model
    from napari_brain_uad.scan_list import ScanEntry

    monkeypatch.setattr(cohort, "_worker", {})
    jobs = [cohort.CohortJob(model_path=resolve_model(name), model_sha256=name, model_metadata={},
                             settings=AnalysisSettings(), out_dir=tmp_path, model_name=name)
            for name in ("ixi-t1-dae-n4", flair_model)]
    cohort._start_worker(jobs, None)
    scan = small_scan(tmp_path / "x_FLAIR.nii.gz")
    row = cohort._score_in_worker(ScanEntry("x_FLAIR", scan), 1)
    assert row["model"] == flair_model and loaded_models == [resolve_model(flair_model)]


def test_evaluate_picks_each_scans_model(flair_model, loaded_models, tmp_path, capsys):
    from napari_brain_uad.model_registry import resolve_model

    flair, t1 = small_scan(tmp_path / "FLAIR.nii.gz"), small_scan(tmp_path / "T1.nii.gz")
    lesions = write_nifti(tmp_path / "lesions.nii.gz", np.zeros((16, 16, 16), np.uint8))
    assert main(["evaluate", "--images", str(flair), str(t1), "--masks", str(lesions), str(lesions), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "FLAIR scan: using flair-test (picked by contrast" in error
    assert "T1 scan: using ixi-t1-dae-n4 (picked by contrast" in error
    assert loaded_models == [resolve_model(flair_model)]  # the FLAIR group first; it stopped there


def test_a_raw_clinical_flair_gets_the_flair_model_and_its_mask_finds_the_lesions(shared_data, tmp_path, capsys):
    """A clinical MS FLAIR as acquired (skull on, 6-8 mm slices), no options: the FLAIR model is
    picked, the brain extracted, and the exported mask at the model's healthy threshold is mostly
    lesion where a voxel picked at random in the brain would be lesion 3 % of the time."""
    folder = shared_data / "ms_clinical" / "104670"
    mask_path = tmp_path / "mask.nii.gz"
    assert main(["score", str(folder / "FLAIR.nii.gz"), "--out-mask", str(mask_path)]) == 0
    assert "FLAIR scan: using nichart-flair-dae (picked by contrast" in capsys.readouterr().err
    exported = nib.load(mask_path)
    lesion = nib.load(folder / "lesionmask.nii.gz")
    brain = np.asarray(nib.load(folder / "brainmask.nii.gz").dataobj) > 0
    np.testing.assert_allclose(exported.affine, nib.load(folder / "FLAIR.nii.gz").affine, atol=1e-5)
    flagged = np.asarray(exported.dataobj) > 0
    truth = np.asarray(lesion.dataobj) > 0
    prevalence = truth[brain].mean()
    precision = (flagged & truth).sum() / flagged.sum()
    recall = (flagged & truth).sum() / truth.sum()
    assert prevalence < 0.05 and precision > 8 * prevalence and recall > 0.2
