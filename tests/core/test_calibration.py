"""Calibration on a user's own healthy scans, and the typicality every door reports (real scans)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_brain_uad import calibration
from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.checkpoint import read_metadata
from napari_brain_uad.cli import main
from napari_brain_uad.scan_reader import read_scan
from napari_brain_uad.model_registry import ModelUnavailable, model_names, resolve_model
from napari_brain_uad.models import load_model
from napari_brain_uad.postprocess import FilteredMap
from napari_brain_uad.thresholds import healthy_percentile_threshold, healthy_threshold_name
from napari_brain_uad.typicality import TYPICALITY_LIMIT, assess

# Held-out healthy IXI subjects: never in the bundled models' training or validation.
HELD_OUT = ("IXI049-HH-1358", "IXI105-HH-1471", "IXI168-HH-1607")


@pytest.fixture
def scanner_scans(shared_data, tmp_path):
    """A user's folder: three healthy scans of their scanner (raw, skull on) listed with brain masks."""
    folder = tmp_path / "my-scanner"
    folder.mkdir()
    lines = ["scan,brain_mask"]
    for subject in HELD_OUT:
        lines.append(f"{shared_data}/ixi_t1/{subject}_T1.nii.gz,{shared_data}/ixi_t1/brainmask/{subject}_brainmask.nii.gz")
    listing = folder / "healthy.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing


@pytest.fixture
def calibrated(scanner_scans, capsys, monkeypatch):
    """The calibrated copy, what the command said, and the filtered maps of the healthy scans its
    threshold was measured on (recorded on their way in, so a test can take their percentile itself)."""
    measured = []
    threshold_of = calibration.healthy_percentile_threshold

    def recording(maps, *arguments, **keywords):
        if not measured:  # the threshold's own call; later ones leave one scan out to check it
            measured.extend(maps)
        return threshold_of(maps, *arguments, **keywords)

    monkeypatch.setattr(calibration, "healthy_percentile_threshold", recording)
    assert main(["calibrate", "--healthy", str(scanner_scans), "--name", "my-scanner", "--quiet",
                 "--device", "cpu"]) == 0
    return scanner_scans.parent / "ixi-t1-dae-n4-calibrated.safetensors", capsys.readouterr().err, measured


def test_the_healthy_threshold_is_the_99th_percentile_of_healthy_scores():
    """By hand: two healthy maps whose brain regions hold the scores 0, 1, …, 100 between them
    (shuffled, with other values outside the regions): their 99th percentile is 99, and 1 score
    in 101 lies above it."""
    scores = np.random.default_rng(0).permutation(101).astype(np.float32)
    maps = []
    for part in (scores[:60], scores[60:]):
        region = np.zeros((8, 8, 2), dtype=bool)
        region.flat[: part.size] = True
        values = np.full(region.shape, 1000.0, dtype=np.float32)  # outside the region: never counted
        values[region] = part
        maps.append(FilteredMap(values, region, region.copy()))
    threshold, record = healthy_percentile_threshold(maps)
    assert threshold == pytest.approx(99.0)
    assert record["percentile"] == 99.0 and record["voxels"] == 101
    assert record["false_positive_fraction"] == pytest.approx(1 / 101)
    assert healthy_threshold_name() == "healthy-99"


def test_a_scan_with_lesions_among_the_healthy_ones_is_named():
    """By hand: four "healthy" maps of 1,000 brain voxels each. Three hold the same healthy
    scores; the fourth holds them too, except that 10 % of its voxels (a patient's lesions) score
    far above. At the threshold the other three give (their 99th percentile, 0.99), 1 % of a
    healthy scan lies above — within the budget — and of the fourth its 100 lesion voxels and the
    9 healthy ones above 0.99 that they did not replace, 10.9 %: named, with its share."""
    healthy_scores = np.linspace(0.0, 1.0, 1000, dtype=np.float32)
    lesioned = healthy_scores.copy()
    lesioned[::10] = 5.0

    def as_map(scores):
        region = np.ones((10, 10, 10), dtype=bool)
        return FilteredMap(scores.reshape(region.shape), region, region.copy())

    maps = [as_map(healthy_scores) for _ in range(3)] + [as_map(lesioned)]
    labels = ["a", "b", "c", "patient"]
    with pytest.warns(calibration.CalibrationWarning, match=r"patient: 10\.9 % of its brain scores above .*leave it out"):
        unusual = calibration.unusual_healthy_scans(maps, labels, percentile=99.0)
    assert list(unusual) == ["patient"] and unusual["patient"] == pytest.approx(0.109)
    # Two scans cannot say which is the odd one: no verdict.
    assert calibration.unusual_healthy_scans(maps[2:], labels[2:], percentile=99.0) == {}


def test_calibrate_refuses_a_name_it_cannot_register_before_any_work(scanner_scans, tmp_path, monkeypatch, capsys):
    """A bundled model's name was refused only after the whole calibration (44 s); an existing
    name of the user's was silently pointed at the new file."""
    def no_analysis(*arguments, **keywords):
        raise AssertionError("the calibration ran before the name was checked")

    monkeypatch.setattr(calibration, "analyse_cases", no_analysis)
    assert main(["calibrate", "--healthy", str(scanner_scans), "--name", "ixi-t1-dae-n4", "--quiet",
                 "--output", str(tmp_path / "a.safetensors")]) == 2
    assert "is the name of a model of the plugin" in capsys.readouterr().err
    from napari_brain_uad.model_registry import register_user_model

    older = tmp_path / "older.safetensors"
    older.write_bytes(b"an older calibration")
    register_user_model("my-scanner", older)
    assert main(["calibrate", "--healthy", str(scanner_scans), "--name", "my-scanner", "--quiet",
                 "--output", str(tmp_path / "b.safetensors")]) == 2
    assert "already names your model" in capsys.readouterr().err
    assert resolve_model("my-scanner") == older.resolve()  # still the file it named


def test_calibrate_writes_a_copy_beside_the_data_that_every_door_can_name(calibrated, scanner_scans):
    output, message, measured = calibrated
    assert output.is_file() and "--model my-scanner" in message
    card, bundled = read_metadata(output), read_metadata(resolve_model(None))
    healthy = card["thresholds"]["healthy-99"]
    assert healthy["subjects"] == [f"{s}_T1" for s in HELD_OUT]
    assert healthy["value"] != bundled["thresholds"]["healthy-99"]["value"]  # measured on the user's scans
    # It is the 99th percentile of the filtered scores in the three scans' brains: about 1 % of the
    # user's healthy brain voxels lie above it.
    assert len(measured) == len(HELD_OUT)
    scores = np.concatenate([scan_map.values[scan_map.region] for scan_map in measured])
    assert healthy["value"] == pytest.approx(float(np.percentile(scores, 99)), rel=1e-6)
    assert np.mean(scores > healthy["value"]) == pytest.approx(0.01, abs=0.002)
    assert healthy["percentile"] == 99 and healthy["false_positive_fraction"] == pytest.approx(0.01, abs=0.002)
    assert "unusual_scans" not in healthy  # three healthy scans: none called unusual
    assert card["thresholds"]["mslub-dice"] == bundled["thresholds"]["mslub-dice"]  # the rest kept
    assert len(card["typicality"]["healthy_values"]) == 3 and card["typicality"]["scorer"] == card["default_scorer"]
    assert card["calibrated_for_scanner"]["from_model"] == "ixi-t1-dae-n4"
    assert any("user's scanner" in limit for limit in card["limits"])
    # By name, in every door: the registry lists it and resolves it to the file.
    assert "my-scanner" in model_names() and resolve_model("my-scanner") == output.resolve()
    # Never over an existing file.
    assert main(["calibrate", "--healthy", str(scanner_scans), "--quiet"]) == 2
    # A registered file that changed is refused by name.
    output.write_bytes(output.read_bytes() + b" ")
    with pytest.raises(ModelUnavailable, match="changed since it was registered"):
        resolve_model("my-scanner")


def test_calibrate_refuses_too_few_scans_and_the_package_folder(shared_data, tmp_path, capsys):
    one = tmp_path / "one.csv"
    one.write_text(f"scan\n{shared_data}/ixi_t1/{HELD_OUT[0]}_T1.nii.gz\n")
    assert main(["calibrate", "--healthy", str(one), "--quiet"]) == 2
    assert "too few to calibrate" in capsys.readouterr().err
    from napari_brain_uad.model_registry import bundled_models_folder

    three = tmp_path / "three.csv"
    three.write_text("scan\n" + "".join(f"{shared_data}/ixi_t1/{s}_T1.nii.gz\n" for s in HELD_OUT))
    inside = bundled_models_folder() / "mine.safetensors"
    assert main(["calibrate", "--healthy", str(three), "--output", str(inside), "--quiet"]) == 2
    assert "bundled models" in capsys.readouterr().err and not inside.exists()


def test_typicality_tells_a_healthy_scan_from_another_contrast(shared_data):
    model, metadata = load_model(resolve_model(None))  # the default model, calibrated on IXI validation scans
    settings = AnalysisSettings.for_model(metadata, device="cpu")
    healthy = read_scan(shared_data / "ixi_t1" / "IXI218-HH-1815_T1.nii.gz")  # held out: never trained or calibrated on
    healthy_mask = read_scan(shared_data / "ixi_t1" / "brainmask" / "IXI218-HH-1815_brainmask.nii.gz").data > 0
    typical = assess(analyse_scan(healthy, model, brain_mask=healthy_mask, settings=settings), metadata)
    assert typical is not None and not typical.atypical and abs(typical.score) < TYPICALITY_LIMIT
    # A T2 scan shown to this T1 model: unlike anything it was calibrated on, and every door says so.
    t2 = read_scan(shared_data / "ixi002" / "T2.nii.gz")
    t2_mask = read_scan(shared_data / "ixi002" / "T2_brainmask.nii.gz").data > 0
    atypical = assess(analyse_scan(t2, model, brain_mask=t2_mask, settings=settings), metadata)
    assert atypical.atypical and atypical.score > typical.score + TYPICALITY_LIMIT
    assert "calibrate the model on a few healthy scans of your scanner" in atypical.describe()
    # Another scorer of the same reconstruction: the same typicality (it measures the reconstruction).
    other = assess(analyse_scan(healthy, model, brain_mask=healthy_mask,
                                settings=AnalysisSettings(scorer="ssim", device="cpu")), metadata)
    assert other is not None and other.score == pytest.approx(typical.score)


def test_score_and_cohort_report_typicality(shared_data, tmp_path, capsys):
    scan = shared_data / "ixi002" / "T2.nii.gz"
    assert main(["score", str(scan), "--brain-mask", str(shared_data / "ixi002" /
                 "T2_brainmask.nii.gz"), "--out-map", str(tmp_path / "map.nii.gz"), "--quiet"]) == 0
    assert "differs from the model's training scans" in capsys.readouterr().err
    listing = tmp_path / "cohort.csv"
    listing.write_text(f"id,scan,brain_mask\nt2,{scan},{shared_data}/ixi002/T2_brainmask.nii.gz\n")
    assert main(["score", str(listing), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 0
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["scans"][0]
    assert row["typicality"] > TYPICALITY_LIMIT and "differs from the model's training scans" in row["warnings"]
    assert np.isfinite(row["typicality"])


def test_typicality_is_the_reconstruction_error_whichever_scorer_draws_the_map():
    """A lesion-direction map (residual-dark/bright) is 0 on most of a healthy brain, so its median
    told nothing; typicality is the median reconstruction error in the model-space brain, the same
    for every scorer of one reconstruction. Records written with the filtered-map median are still
    read with it."""
    from types import SimpleNamespace

    from napari_brain_uad.postprocess import FilteredMap
    from napari_brain_uad.typicality import MEDIAN_FILTERED, healthy_record

    rng = np.random.default_rng(0)
    brain = np.zeros((24, 24, 12), dtype=bool)
    brain[2:22, 2:22, 1:11] = True

    def analysed(error_level, scorer="residual-dark", lesion=False):
        image = np.where(brain, rng.uniform(0.2, 0.8, brain.shape), 0).astype(np.float32)
        reconstruction = image + np.where(brain, rng.normal(0, error_level, brain.shape), 0).astype(np.float32)
        if lesion:  # a lesion on 5 % of the brain, badly reconstructed
            reconstruction[2:3, 2:22, 1:11] += 0.5
        one_way = np.where(brain, np.maximum(reconstruction - image, 0), 0).astype(np.float32)
        return SimpleNamespace(model_space=SimpleNamespace(image=image, brain_mask=brain),
                               reconstruction_model_space=reconstruction, settings=AnalysisSettings(scorer=scorer),
                               filtered=FilteredMap(one_way, brain, brain, (2.0, 2.0, 2.0)))

    healthy = [analysed(level) for level in (0.010, 0.011, 0.012, 0.009, 0.010)]
    record = healthy_record(healthy, AnalysisSettings(scorer="residual-dark"), ["a", "b", "c", "d", "e"])
    assert record["healthy_median"] > 0 and record["healthy_spread"] > 0
    metadata = {"typicality": record}
    assert not assess(analysed(0.010), metadata).atypical
    assert assess(analysed(0.030), metadata).atypical  # reconstructed 3x worse everywhere
    assert not assess(analysed(0.010, lesion=True), metadata).atypical
    same = analysed(0.010)
    other_scorer = SimpleNamespace(**{**vars(same), "settings": AnalysisSettings(scorer="ssim")})
    assert assess(other_scorer, metadata).score == assess(same, metadata).score
    old = {**record, "statistic": MEDIAN_FILTERED, "healthy_median": 0.5, "healthy_spread": 0.1}
    assert assess(same, {"typicality": old}).statistic == float(np.median(same.filtered.values[brain]))
    assert assess(other_scorer, {"typicality": old}) is None  # the old record held for its scorer only
