"""The dock widget in a real napari window (needs a display: run under Xvfb)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_brain_uad._widget import FILE_CHOICE, NO_PRESET, BrainUADWidget
from napari_brain_uad.metrics import auprc
from napari_brain_uad.model_registry import default_model_name


@pytest.fixture
def viewer_with_widget(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    return viewer, widget


def test_command_opens_our_widget(viewer_with_widget):
    _, widget = viewer_with_widget
    assert isinstance(widget, BrainUADWidget)
    assert "Open a NIfTI scan" in widget.scan_info.value


def test_sample_mask_edit_export_reload(viewer_with_widget, shared_data, tmp_path):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    assert "T1.nii.gz" in widget.scan_info.value and "LAS" in widget.scan_info.value
    assert "182 × 218 × 182" in widget.scan_info.value

    # A user's edit of the lesion mask: erase one lesion voxel, paint a new one.
    lesions = viewer.layers["MSLUB lesion mask"]
    edited = lesions.data.copy()
    first = tuple(np.argwhere(edited > 0)[0])
    edited[first] = 0
    edited[10, 20, 30] = 1
    lesions.data = edited
    widget.mask.value = lesions

    out = widget.export_mask(tmp_path / "edited.nii.gz")
    saved = nib.load(out)
    original = nib.load(shared_data / "mslub/patient26/lesionmask.nii.gz")
    np.testing.assert_array_equal(saved.affine, original.affine)
    geometry = lesions.metadata["nifti"]
    np.testing.assert_array_equal(np.asarray(saved.dataobj), geometry.to_source(edited))
    changed = np.argwhere(np.asarray(saved.dataobj) != np.asarray(original.dataobj))
    assert len(changed) == 2  # exactly the two edited voxels, nothing else moved

    # Reload through our reader: the same voxels in the viewer.
    (reloaded,) = viewer.open(str(out), plugin="napari-brain-uad")
    np.testing.assert_array_equal(reloaded.data, edited)

    with pytest.raises(FileExistsError):
        widget.export_mask(out)


def test_export_never_starts_on_a_reference_or_brain_mask(viewer_with_widget, shared_data):
    """Opening a sample with the expert's lesion mask, or a brain mask from disk, must not make
    either what Export writes: before a run there is nothing of the user's to export; a brain
    mask shows as an outline."""
    from napari_brain_uad._widget import BrainUADError

    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    (brain,) = viewer.open(str(shared_data / "ixi_t1/brainmask/IXI105-HH-1471_brainmask.nii.gz"),
                           plugin="napari-brain-uad")
    assert brain.metadata["role"] == "brain" and brain.name.endswith(" brain") and brain.contour == 1
    assert viewer.layers["MSLUB lesion mask"].metadata["role"] == "reference"
    assert widget.mask.value is None
    with pytest.raises(BrainUADError, match="choose a Labels layer"):
        widget.export_mask("never-written.nii.gz")
    # A deliberate choice stands when layers come and go.
    widget.mask.value = viewer.layers["MSLUB lesion mask"]
    viewer.add_labels(np.zeros((4, 4, 4), dtype=np.uint8), name="scratch")
    assert widget.mask.value.name == "MSLUB lesion mask"


def test_overlay_is_drawn(make_napari_viewer, shared_data):
    viewer = make_napari_viewer(show=True)  # the canvas renders only in a shown window
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    viewer.dims.set_point(0, viewer.layers["MSLUB lesion mask"].translate[0] + 90)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 100
    grey = shot[..., :3].std()
    assert grey > 10  # not a blank canvas
    # Label colours are not grey: the lesion overlay shows.
    saturation = shot[..., :3].max(axis=-1).astype(int) - shot[..., :3].min(axis=-1)
    assert (saturation > 60).sum() > 20


def test_export_without_geometry_says_why(viewer_with_widget, tmp_path):
    viewer, widget = viewer_with_widget
    viewer.add_labels(np.zeros((5, 6, 7), dtype=np.uint8), name="drawn")
    widget.mask.value = viewer.layers["drawn"]
    with pytest.raises(Exception, match="no NIfTI geometry"):
        widget.export_mask(tmp_path / "drawn.nii.gz")
    assert not (tmp_path / "drawn.nii.gz").exists()


# ---------------------------------------------------------------- running a model from the widget


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A small DDPM written by the training module itself (a few steps on two IXI subjects)."""
    from brain_uad_training import TrainingConfig, fit

    from conftest import IXI_TRAINING_SUBJECTS, SHARED_DATA

    folder = SHARED_DATA / "ixi_t1"
    if not folder.is_dir():
        pytest.skip(f"healthy IXI scans not found in {folder}")
    files = [str(folder / f"{subject}_T1.nii.gz") for subject in IXI_TRAINING_SUBJECTS]
    output = tmp_path_factory.mktemp("model")
    config = TrainingConfig(
        data=tuple(files), brain_masks=str(folder / "brainmask"), output=str(output), steps=3, batch_size=4,
        validation_fraction=0.5, validation_slices=4, data_description="two IXI subjects (test)",
        model={"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16},
    )
    return fit(config, show_progress=False).last


def run_and_wait(widget, qtbot, timeout_ms=240_000):
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout_ms)


@pytest.fixture
def mslub_in_widget(viewer_with_widget, trained_checkpoint):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    widget.model_file.value = str(trained_checkpoint)
    return viewer, widget


def test_run_shows_aligned_results_and_the_slider_changes_the_mask(mslub_in_widget, qtbot, tmp_path, shared_data):
    viewer, widget = mslub_in_widget
    assert "ddpm, T1" in widget.model_info.value and "two IXI subjects" in widget.model_info.value
    widget.scorer.value = "residual"
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    scan = viewer.layers["MSLUB T1"]
    for name in ("reconstruction", "anomaly map", "proposal", "annotation"):
        layer = viewer.layers[f"MSLUB T1 {name}"]
        assert layer.data.shape == scan.data.shape
        np.testing.assert_array_equal(layer.scale, scan.scale)
        np.testing.assert_array_equal(layer.translate, scan.translate)
    labels = viewer.layers["MSLUB T1 proposal"]
    low, high = widget.threshold.min, widget.threshold.max
    widget.threshold.value = low + 0.05 * (high - low)
    many = int((labels.data > 0).sum())
    widget.threshold.value = low + 0.6 * (high - low)
    few = int((labels.data > 0).sum())
    assert many > few  # the proposal follows the slider, with no new run

    # Findings: one row per component; clicking a row takes the viewer to it.
    widget.threshold.value = low + 0.3 * (high - low)
    widget.review.refresh_table()  # what the timer does once the slider rests
    rows = widget.review.table.data.to_list()
    session = widget.session
    assert session.threshold == widget.threshold.value and session.preset is None  # the user's own threshold
    assert len(rows) == session.analysis.labels_at(session.threshold, session.min_size_ml).max()
    assert rows and rows[0][0] == 1 and rows[0][1] == "open"  # largest first, not yet decided
    widget.review.table.native.cellClicked.emit(0, 0)
    centre = widget.review.findings[0].centre_voxel
    world = scan.metadata["nifti"].source_index_to_world(centre)
    np.testing.assert_allclose(viewer.dims.point[:3], world, atol=max(scan.scale))

    written = widget.export_results(tmp_path)
    assert sorted(p.name for p in written) == ["T1_anomaly_map.nii.gz", "T1_reconstruction.nii.gz"]
    saved_map = nib.load(tmp_path / "T1_anomaly_map.nii.gz")
    np.testing.assert_allclose(np.asarray(saved_map.dataobj), session.analysis.anomaly_map, rtol=1e-6)
    with pytest.raises(FileExistsError):
        widget.export_results(tmp_path)  # never over a user's files

    # Evaluate: the proposal against itself scores Dice 1 at the slider's threshold (same
    # grid, same threshold); against the expert lesion mask the numbers are valid fractions.
    from napari_brain_uad._evaluate_widget import EvaluateWidget

    evaluate = EvaluateWidget(viewer)
    evaluate.reset_choices()
    evaluate.anomaly_map.value = viewer.layers["MSLUB T1 anomaly map"]
    assert viewer.layers["MSLUB T1 anomaly map"].metadata["session"] is session
    assert evaluate.threshold.value == pytest.approx(widget.threshold.value)
    evaluate.truth.value = labels
    assert evaluate.evaluate()["dice"] == pytest.approx(1.0)
    evaluate.truth.value = viewer.layers["MSLUB lesion mask"]
    evaluate._evaluate_and_show()
    scores = evaluate.scores
    assert 0 <= scores["dice"] <= scores["best_dice"] <= 1 and 0 < scores["auprc"] <= 1
    assert "AUPRC" in evaluate.results.value
    # The numbers are brain-uad evaluate's: the session's analysis, threshold and minimum size.
    from napari_brain_uad.evaluation import evaluate_analysis

    lesions = scan.metadata["nifti"].to_source(viewer.layers["MSLUB lesion mask"].data) > 0
    cli = evaluate_analysis(session.analysis, lesions, threshold=evaluate.threshold.value,
                            min_size_ml=session.min_size_ml)
    assert (scores["dice"], scores["best_dice"], scores["auprc"]) == (cli.dice, cli.best_dice, cli.auprc)
    # The precision-recall curve is drawn, with the slider's operating point on it.
    curve = evaluate.pr_curve
    assert curve["recall"].size > 10 and curve["recall"][-1] == pytest.approx(1.0)
    image = evaluate.curve.grab().toImage()
    orange = sum(image.pixelColor(x, y).red() > 200 and 120 < image.pixelColor(x, y).green() < 220
                 and image.pixelColor(x, y).blue() < 100
                 for x in range(0, image.width(), 2) for y in range(0, image.height(), 2))
    assert orange > 20

    widget.mask.value = labels  # any Labels layer can be exported; the default is the user's own
    out = widget.export_mask(tmp_path / "proposal.nii.gz")
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, nib.load(shared_data / "mslub/patient26/T1.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0,
                                  scan.metadata["nifti"].to_source(labels.data) > 0)


def test_cancel_leaves_no_half_results(mslub_in_widget, qtbot):
    viewer, widget = mslub_in_widget
    before = [layer.name for layer in viewer.layers]
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=240_000)
    assert widget.status.value.startswith("Cancelled")
    assert [layer.name for layer in viewer.layers] == before
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_errors_say_what_is_missing(viewer_with_widget, tmp_path, qtbot):
    viewer, widget = viewer_with_widget
    widget.run()
    assert "open a scan first" in widget.status.value
    viewer.add_image(np.zeros((10, 10), dtype=np.float32), name="flat")
    widget.scan.value = viewer.layers["flat"]
    widget.run()
    assert "3D scan opened from NIfTI" in widget.status.value
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    widget.model_choice.value = FILE_CHOICE
    widget.run()
    assert "choose a model checkpoint" in widget.status.value
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    widget.model_file.value = str(corrupt)
    assert "Not usable" in widget.model_info.value
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Error") and "corrupt.safetensors" in widget.status.value


def test_a_bug_in_the_analysis_is_reported_as_a_bug_not_as_a_user_mistake(viewer_with_widget, qtbot, monkeypatch,
                                                                           caplog):
    from napari_brain_uad import analysis

    def broken(*args, **kwargs):
        raise ValueError("index out of step")

    monkeypatch.setattr(analysis, "analyse_scan", broken)
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    before = [layer.name for layer in viewer.layers]
    with caplog.at_level("ERROR", logger="napari_brain_uad"):
        run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Error: internal error (ValueError: index out of step)")
    assert "this is a bug" in widget.status.value
    assert "Traceback" in caplog.text  # the log keeps what a bug report needs
    assert [layer.name for layer in viewer.layers] == before and widget.run_button.enabled


def test_a_model_for_another_contrast_is_flagged(viewer_with_widget, trained_checkpoint):
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.model_file.value = str(trained_checkpoint)  # trained on T1
    widget.scan.value = viewer.layers["MSLUB FLAIR"]
    assert "looks like FLAIR but the model was trained on T1" in widget.model_info.value
    widget.scan.value = viewer.layers["MSLUB T1"]
    assert "looks like" not in widget.model_info.value


def test_the_scans_contrast_picks_the_model_until_the_user_chooses_one(flair_model, viewer_with_widget):
    viewer, widget = viewer_with_widget  # built after flair_model: its list offers flair-test
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB FLAIR"]
    assert widget.model_choice.value == flair_model
    assert widget.model_pick.value == "FLAIR scan: using flair-test (picked by contrast; choose another above)"
    assert not widget.model_pick.native.isHidden() and not widget.model_chosen_by_user  # (the window is not shown)
    widget.scan.value = viewer.layers["MSLUB T1"]
    assert widget.model_choice.value == default_model_name() and widget.model_pick.value.startswith("T1 scan: using")
    viewer.add_image(np.zeros((4, 4, 4)), name="unrelated")  # napari resets the dock's lists: no choice made
    assert not widget.model_chosen_by_user
    # A model the user chooses holds for every scan, and the dock warns when it does not fit.
    widget.model_choice.value = "ixi-t1-ddpm"
    assert widget.model_chosen_by_user and widget.model_pick.native.isHidden()
    widget.scan.value = viewer.layers["MSLUB FLAIR"]
    assert widget.model_choice.value == "ixi-t1-ddpm"
    assert "looks like FLAIR but the model was trained on T1" in widget.model_headline.value


def test_the_anomaly_overlay_shows_on_screen(make_napari_viewer, trained_checkpoint, qtbot, shared_data):
    viewer = make_napari_viewer(show=True)  # the canvas renders only in a shown window
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    for name in ("MSLUB T2", "MSLUB FLAIR", "MSLUB lesion mask"):
        viewer.layers[name].visible = False
    widget.scan.value = viewer.layers["MSLUB T1"]
    widget.model_file.value = str(trained_checkpoint)
    widget.scorer.value = "residual"
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    viewer.dims.set_point(0, viewer.layers["MSLUB T1"].translate[0] + 90)
    with_overlay = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    viewer.layers["MSLUB T1 anomaly map"].visible = False
    viewer.layers["MSLUB T1 proposal"].visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    assert without.std() > 10  # the scan itself is drawn
    changed = np.abs(with_overlay - without).max(axis=-1) > 30
    assert changed.mean() > 0.01  # the overlay visibly colours part of the brain
    # ... and only part of it: below its floor the map is transparent, the anatomy untinted.
    brain = without.max(axis=-1) > 20
    assert changed[brain].mean() < 0.25
    # One colour family: where the map tints the scan, it adds red, never blue.
    tint = with_overlay[changed] - without[changed]
    assert (tint[:, 0] >= tint[:, 2]).mean() > 0.95


def test_the_bundled_model_runs_by_default_with_its_threshold_and_median_switch(viewer_with_widget, qtbot):
    viewer, widget = viewer_with_widget
    assert widget.model_choice.value == default_model_name() and not widget.model_file.visible
    assert "T1" in widget.model_info.value and "IXI" in widget.model_info.value
    metadata = widget._model_metadata
    assert widget.scorer.value == metadata["default_scorer"]
    assert "healthy-99" in widget.threshold_preset.choices

    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    # The slider starts at the model's healthy-percentile threshold.
    assert widget.threshold_preset.value == "healthy-99"
    assert widget.threshold.value == pytest.approx(metadata["thresholds"]["healthy-99"]["value"], abs=1e-6)  # the slider keeps 6 decimals
    # The overlay points at the expert's lesions: ranking the brain by the filtered map finds
    # them several times better than chance (their share of the brain).
    analysis = widget.session.analysis
    lesions = viewer.layers["MSLUB T1"].metadata["nifti"].to_source(viewer.layers["MSLUB lesion mask"].data) > 0
    region = analysis.filtered.region
    assert auprc(analysis.filtered.values, lesions, region) > 3 * lesions[region].mean()

    # Median off: only the post-processing runs again; the mask and findings follow.
    before = widget.review.proposal_layer.data.copy()
    widget.median.value = False
    qtbot.waitUntil(lambda: widget._median_worker is None, timeout=60_000)
    refiltered = widget.session.analysis
    assert refiltered.reconstruction_model_space is analysis.reconstruction_model_space and not refiltered.filtered.median
    assert widget.session.threshold == pytest.approx(metadata["thresholds"]["healthy-99"]["value"])  # kept
    assert "Median filter off" in widget.status.value
    assert not np.array_equal(widget.review.proposal_layer.data, before)
    widget.threshold_preset.value = NO_PRESET  # a preset is a shortcut; the slider stays where it is
    widget.threshold_preset.value = "healthy-99"
    assert widget.threshold.value == pytest.approx(metadata["thresholds"]["healthy-99"]["value"], abs=1e-6)  # the slider keeps 6 decimals


def test_a_raw_scan_gets_a_brain_layer_the_user_can_correct(viewer_with_widget, qtbot, shared_data):
    """A raw T1 (skull on) and the bundled model, nothing else: the run extracts the brain and
    shows it as a Labels layer chosen as the brain mask; the user erases part of it, and the
    next run scores inside the corrected brain, leaving the user's layer as they left it."""
    viewer, widget = viewer_with_widget
    subject = "IXI105-HH-1471"
    (scan,) = viewer.open(str(shared_data / f"ixi_t1/{subject}_T1.nii.gz"), plugin="napari-brain-uad")
    widget.scan.value = scan
    assert widget.brain_mask.value is None
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done") and "extracted by deepbet" in widget.status.value
    brain = viewer.layers[f"{scan.name} brain"]
    assert widget.brain_mask.value is brain
    geometry = scan.metadata["nifti"]
    reference = nib.load(shared_data / f"ixi_t1/brainmask/{subject}_brainmask.nii.gz").get_fdata() > 0
    found = geometry.to_source(np.asarray(brain.data)) > 0
    assert 2 * (found & reference).sum() / (found.sum() + reference.sum()) > 0.93

    corrected = np.asarray(brain.data).copy()
    corrected[: corrected.shape[0] // 3] = 0  # the user erases the top third of the brain
    brain.data = corrected
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done") and "brain given" in widget.status.value
    np.testing.assert_array_equal(viewer.layers[f"{scan.name} brain"].data, corrected)
    scored = geometry.to_display(widget.session.analysis.anomaly_map) != 0
    assert not scored[: corrected.shape[0] // 3].any()  # nothing scored where the user erased the brain


def test_closing_the_window_during_brain_extraction_cancels_and_ends_the_work(viewer_with_widget, qtbot,
                                                                             shared_data):
    """The user closes napari while a raw scan's brain is being extracted: the progress bar
    had been moving, the close cancels the analysis and waits for it, so no worker outlives the
    widgets it reports to (the process used to abort on exit) and nothing half-done is shown."""
    from napari_brain_uad._worker import running_work

    viewer, widget = viewer_with_widget
    (scan,) = viewer.open(str(shared_data / "ixi_t1/IXI105-HH-1471_T1.nii.gz"), plugin="napari-brain-uad")
    widget.scan.value = scan
    seen = []
    widget._relay.changed.connect(lambda fraction, stage: seen.append((stage, fraction)))
    widget.run()
    qtbot.waitUntil(lambda: sum(stage == "brain" for stage, _ in seen) >= 3, timeout=120_000)
    fractions = [fraction for stage, fraction in seen if stage == "brain"]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]  # it moves, layer by layer
    assert running_work() == 1
    viewer.close()
    assert running_work() == 0  # ended before the window went
    assert widget._worker is None and widget.session is None
    assert f"{scan.name} anomaly map" not in [layer.name for layer in viewer.layers]


# ---------------------------------------------------------------- readable at a glance, in a normal window


def _rendered_label_colour(viewer) -> np.ndarray:
    """The mean colour of the canvas pixels a Labels layer lights up (the canvas is black elsewhere)."""
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    lit = shot.max(axis=-1) > 40
    assert lit.sum() > 20, "the labels did not show on the canvas"
    return shot[lit].mean(axis=0)


def test_proposal_and_a_reference_mask_from_disk_render_in_their_own_colours(make_napari_viewer, shared_data):
    """A mask opened from disk is named and drawn as a reference; the same voxels drawn as the
    model's proposal come out in another colour, each the nearest to its own role's colour."""
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_brain_uad._styles import LABEL_LOOKS, PROPOSAL, REFERENCE, label_style

    viewer = make_napari_viewer(show=True)  # the canvas renders only in a shown window
    (reference,) = viewer.open(str(shared_data / "mslub/patient26/lesionmask.nii.gz"), plugin="napari-brain-uad")
    assert reference.name == "lesionmask (reference)"
    proposal = viewer.add_labels(reference.data, name="proposal", scale=reference.scale,
                                 translate=reference.translate, **label_style(PROPOSAL))
    fullest = int(np.argmax((reference.data > 0).sum(axis=(1, 2))))  # the slice with the most lesion
    viewer.dims.set_point(0, reference.translate[0] + fullest * reference.scale[0])

    rendered = {}
    for kind, shown, hidden in ((REFERENCE, reference, proposal), (PROPOSAL, proposal, reference)):
        shown.visible, hidden.visible = True, False
        rendered[kind] = _rendered_label_colour(viewer)
    # Over the black canvas a label's pixel is its colour scaled by the layer's opacity.
    expected = {kind: 255 * transform_color(look.colour)[0][:3] * look.opacity for kind, look in LABEL_LOOKS.items()}
    for kind, colour in rendered.items():
        nearest = min(expected, key=lambda role: np.linalg.norm(expected[role] - colour))
        assert nearest == kind, (kind, colour, expected)
    assert np.linalg.norm(rendered[REFERENCE] - rendered[PROPOSAL]) > 100


def test_a_multi_contrast_sample_opens_with_one_contrast_shown(make_napari_viewer, shared_data):
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_brain_uad._styles import LABEL_LOOKS, REFERENCE

    viewer = make_napari_viewer()
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    shown_images = [layer.name for layer in viewer.layers if layer._type_string == "image" and layer.visible]
    assert shown_images == ["MSLUB T1"]
    lesions = viewer.layers["MSLUB lesion mask"]  # the registry's name, which already says what it is
    assert lesions.visible
    reference_colour = transform_color(LABEL_LOOKS[REFERENCE].colour)[0]
    np.testing.assert_allclose(lesions.colormap.map(np.array([1]))[0], reference_colour)
    assert lesions.colormap.map(np.array([0]))[0][3] == 0  # background transparent


def test_the_scan_chosen_is_the_image_on_top_when_several_contrasts_are_open(make_napari_viewer, shared_data, qtbot):
    """``make napari`` opens T1, T2 and FLAIR files at once (the FLAIR last, so on top) and the
    dock analyses the T1: the T1 must be what the user sees, and so must any scan chosen later;
    an image the user adds afterwards is left where napari puts it."""
    viewer = make_napari_viewer()
    patient = shared_data / "mslub" / "patient26"
    viewer.open([str(patient / f"{contrast}.nii.gz") for contrast in ("T1", "T2", "FLAIR")], plugin="napari-brain-uad")
    _, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")

    def top_image():
        return [layer.name for layer in viewer.layers if layer._type_string == "image" and layer.visible][-1]

    assert widget.scan.value.name == "T1"
    qtbot.waitUntil(lambda: top_image() == "T1")
    widget.scan.value = viewer.layers["FLAIR"]
    qtbot.waitUntil(lambda: top_image() == "FLAIR")
    viewer.open(str(patient / "T2.nii.gz"), plugin="napari-brain-uad", name="T2 again")
    qtbot.wait(50)
    assert top_image() == "T2 again" and widget.scan.value.name == "FLAIR"  # the user's new image stays on top


def test_the_dock_leaves_the_scan_most_of_a_1280_by_800_window(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-brain-uad")
    window = dock.window()  # the main window, through Qt's own parent chain
    window.resize(1280, 800)
    widget.model_details.value = True  # the whole model card shown: the tallest, widest text
    qtbot.wait(200)
    assert "trained on" in widget.model_info.value and widget.model_info.native.isVisible()
    assert window.width() == 1280
    assert dock.width() <= 0.35 * window.width(), dock.width()
    assert widget.run_button.native.isVisible() and widget.run_button.enabled
    assert not widget.threshold.native.visibleRegion().isEmpty()  # on screen without scrolling
    # The lowest rows stay reachable: the form scrolls rather than being cut off.
    widget.native.ensureWidgetVisible(widget.export_results_button.native)
    qtbot.wait(50)
    assert not widget.export_results_button.native.visibleRegion().isEmpty()
    # The model card's first line always shows; its details only behind the switch.
    widget.model_details.value = False
    qtbot.wait(50)
    assert widget.model_headline.native.isVisible() and not widget.model_info.native.isVisible()
    assert widget.model_headline.value == widget.model_info.value.splitlines()[0]



# ---------------------------------------------------------------- the user's work is never lost


@pytest.fixture
def reviewed(mslub_in_widget, qtbot):
    """The MSLUB T1 run with the small trained model, at a threshold with several findings."""
    viewer, widget = mslub_in_widget
    widget.scorer.value = "residual"
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    low, high = widget.threshold.min, widget.threshold.max
    for fraction in np.linspace(0.4, 0.95, 12):  # this small model's map: find a threshold with a few findings
        widget.threshold.value = low + fraction * (high - low)
        widget.review.refresh_table()
        if len(widget.review.findings) >= 3:
            break
    assert len(widget.review.findings) >= 3
    yield viewer, widget
    widget.review.unsaved = False  # the test is over: closing its window must not ask


def test_painted_voxels_survive_the_slider_and_undo_still_works(reviewed):
    """Paint in the user's layer, then move the slider and the minimum size: the painted voxels
    stay; napari's undo still takes the stroke back."""
    viewer, widget = reviewed
    annotation = viewer.layers["MSLUB T1 annotation"]
    assert widget.mask.value.unique_id == annotation.unique_id and widget.review.unsaved is False
    viewer.layers.selection.active = annotation
    annotation.selected_label = 1
    annotation.brush_size = 5
    centre = tuple(int(n) // 2 for n in annotation.data.shape)
    annotation.paint(centre, 1)  # a brush stroke, as the mouse makes it
    painted = annotation.data.copy()
    assert painted[centre] == 1 and widget.review.unsaved
    for fraction in (0.05, 0.9, 0.5):
        widget.threshold.value = widget.threshold.min + fraction * (widget.threshold.max - widget.threshold.min)
    widget.min_size_ml.value = 0.5
    np.testing.assert_array_equal(annotation.data, painted)
    annotation.undo()
    assert annotation.data[centre] == 0 and not annotation.data.any()


def test_accept_and_reject_give_an_export_of_exactly_the_accepted_findings_and_strokes(reviewed, tmp_path):
    viewer, widget = reviewed
    review, geometry = widget.review, viewer.layers["MSLUB T1"].metadata["nifti"]
    review.step(+1)
    first = review.session.finding_mask(review.findings[0].number)
    review.accept_current()  # moves on to the next open finding
    assert review.current == 1
    second = review.session.finding_mask(review.findings[1].number)
    review.reject_current()
    assert [f.status for f in review.findings[:2]] == ["accepted", "rejected"]
    stroke = np.zeros(geometry.shape, bool)
    stroke[20:24, 20:24, 20:24] = True  # the user's own stroke, away from the findings
    annotation = viewer.layers["MSLUB T1 annotation"]
    annotation.data_setitem(tuple(np.nonzero(geometry.to_display(stroke))), 1)
    # The slider moves after the decisions: none of them is lost.
    widget.threshold.value = widget.threshold.min + 0.5 * (widget.threshold.max - widget.threshold.min)
    widget.review.refresh_table()
    out = widget.export_mask(tmp_path / "reviewed.nii.gz")
    saved = np.asarray(nib.load(out).dataobj) > 0
    np.testing.assert_array_equal(saved, first | stroke)
    assert not (saved & second).any() and not review.unsaved
    proposal = geometry.to_source(viewer.layers["MSLUB T1 proposal"].data) > 0
    assert not (proposal & (first | second)).any()  # decided findings are no longer proposed
    # The keyboard does the same: Shift+N, Shift+P, Shift+A and Shift+R are bound on the viewer.
    bound = {str(key): handler for key, handler in viewer.keymap.items()}
    assert {"Shift+N", "Shift+P", "Shift+A", "Shift+R"} <= set(bound)
    # (At the lower threshold the decided findings may have grown: "partly" decided ones need a look too.)
    open_row = next(row for row, finding in enumerate(review.findings)
                    if finding.status in ("open", "partly accepted", "partly rejected"))
    review.current = open_row - 1 if open_row else None
    bound["Shift+N"](viewer)  # that open finding in view, as the key would do
    assert review.current == open_row
    number = review.findings[open_row].number
    bound["Shift+A"](viewer)
    assert next(f for f in review.findings if f.number == number).status == "accepted" and review.unsaved


def test_a_rerun_keeps_the_users_layer_and_their_decisions(reviewed, qtbot):
    viewer, widget = reviewed
    review = widget.review
    review.step(+1)
    review.reject_current()
    annotation = viewer.layers["MSLUB T1 annotation"]
    annotation.data_setitem((np.array([30]), np.array([40]), np.array([50])), 1)
    edited = annotation.data.copy()
    chosen = widget.threshold.value  # the user's own threshold (the fixture moved the slider)
    assert review.session.preset is None
    run_and_wait(widget, qtbot)
    assert viewer.layers["MSLUB T1 annotation"].unique_id == annotation.unique_id  # the same layer, not a new one
    np.testing.assert_array_equal(annotation.data, edited)
    assert review.session.rejected is not None and review.session.rejected.any()
    # The same model and scorer: the user's threshold stands, it is not reset to the preset.
    assert review.session.threshold == pytest.approx(chosen) and widget.threshold.value == pytest.approx(chosen)


def test_the_finding_under_review_is_outlined_and_zoomed_to_and_the_annotation_stays_on_top(reviewed, qtbot):
    viewer, widget = reviewed
    review = widget.review
    zoom = viewer.camera.zoom
    review.go_to(min(range(len(review.findings)), key=lambda row: review.findings[row].volume_ml))  # the smallest
    finding = review.findings[review.current]
    marker = viewer.layers["MSLUB T1 finding under review"]
    geometry = viewer.layers["MSLUB T1"].metadata["nifti"]
    np.testing.assert_array_equal(geometry.to_source(np.asarray(marker.data)) > 0,
                                  review.session.finding_mask(finding.number))
    assert marker.contour == 2 and viewer.layers["MSLUB T1 proposal"].contour == 1
    assert viewer.camera.zoom > zoom  # closer in on the finding
    # A new threshold renumbers the findings: the outline goes until the user picks one again.
    widget.threshold.value = widget.threshold.value + 0.05 * (widget.threshold.max - widget.threshold.min)
    assert not np.asarray(marker.data).any()
    # A re-run replaces the map; the user's annotation stays above it (never tinted by it).
    run_and_wait(widget, qtbot)
    names = [layer.name for layer in viewer.layers]
    assert names[-3:] == ["MSLUB T1 proposal", "MSLUB T1 annotation", "MSLUB T1 finding under review"]
    assert names.index("MSLUB T1 anomaly map") < names.index("MSLUB T1 proposal")


def test_the_maps_floor_is_tied_to_the_healthy_threshold():
    from napari_brain_uad._styles import anomaly_map_limits

    scores = np.linspace(0.0, 0.4, 1001)
    assert anomaly_map_limits(scores, 0.1) == (pytest.approx(0.05), pytest.approx(0.4))
    # Uncalibrated: from the 95th percentile of the brain's own scores.
    assert anomaly_map_limits(scores, None)[0] == pytest.approx(0.38)
    # A map that never reaches the floor still shows its top.
    low, high = anomaly_map_limits(scores, 2.0)
    assert low < high == pytest.approx(0.4)


def test_closing_with_unexported_edits_asks_first(reviewed, monkeypatch, tmp_path):
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = reviewed
    window = widget.native.window()
    widget.review.step(+1)
    widget.review.accept_current()
    assert widget.review.unsaved
    asked = []  # the questions' texts (not the window: a test must not keep it alive)
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *rest: asked.append(text) or
                        QMessageBox.StandardButton.Cancel)
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QApplication

    closing = QCloseEvent()
    QApplication.sendEvent(window, closing)  # what closing the window sends
    assert asked and "not exported" in asked[0]
    assert not closing.isAccepted()  # the window stays: the user said Cancel
    widget.export_mask(tmp_path / "annotation.nii.gz")
    asked.clear()
    assert not widget.review.unsaved
    QApplication.sendEvent(window, QCloseEvent())
    assert not asked  # exported: nothing to ask


def test_edits_of_an_earlier_scan_are_still_guarded_after_running_another(reviewed, monkeypatch, qtbot):
    """Accept a finding on the T1, then run the T2: closing still asks, naming the T1's mask."""
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QApplication, QMessageBox

    viewer, widget = reviewed
    widget.review.step(+1)
    widget.review.accept_current()
    widget.scan.value = viewer.layers["MSLUB T2"]
    run_and_wait(widget, qtbot)
    assert "MSLUB T2 annotation" in viewer.layers and "MSLUB T1 annotation" in viewer.layers
    asked = []  # the questions' texts (not the window: a test must not keep it alive)
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *rest: asked.append(text) or
                        QMessageBox.StandardButton.Cancel)
    closing = QCloseEvent()
    QApplication.sendEvent(widget.native.window(), closing)
    assert asked and "MSLUB T1 annotation" in asked[0] and not closing.isAccepted()


def test_lesion_direction_switch_follows_the_models_contrast(viewer_with_widget):
    """The default model is a T1 model whose default scorer (chosen on real lesions) counts only
    darker voxels: "lesion direction only" starts ticked; off gives the two-way residual with its
    own calibrated threshold; choosing another scorer unticks it, and on again brings it back."""
    _, widget = viewer_with_widget
    assert widget.lesion_direction.enabled and widget.scorer.value == "residual-dark"
    assert widget.lesion_direction.value
    widget.lesion_direction.value = False
    assert widget.scorer.value == "residual"
    assert "healthy-99-residual" in widget.threshold_preset.choices
    assert "healthy-99" not in widget.threshold_preset.choices  # the lesion-direction residual's
    widget.scorer.value = "ssim"
    assert not widget.lesion_direction.value
    widget.lesion_direction.value = True
    assert widget.scorer.value == "residual-dark" and "healthy-99" in widget.threshold_preset.choices
    widget.scorer.value = "residual-dark"
    assert widget.lesion_direction.value  # ticked whoever chose the one-way scorer


def test_a_model_with_its_own_maps_shows_them_and_brings_its_scorer(viewer_with_widget, qtbot, tmp_path):
    """PHANES (untrained, small): its pseudo-healthy image is the reconstruction layer, and its
    mask and perceptual map come as layers of their own; a model without those maps is not
    offered the scorer that needs them."""
    import torch

    from napari_brain_uad.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("phanes", {"channels": [16, 32, 32, 64], "latent_size": 64, "generator_channels": [8, 16, 32],
                                   "aot_blocks": 1, "discriminator_channels": [8, 16, 32, 32]})
    checkpoint = save_model(tmp_path / "phanes.safetensors", model)
    viewer, widget = viewer_with_widget
    viewer.open_sample("napari-brain-uad", "mslub-patient26")
    widget.scan.value = viewer.layers["MSLUB T1"]
    widget.model_choice.value = FILE_CHOICE
    widget.model_file.value = str(checkpoint)
    assert widget.scorer.value == "phanes" and "phanes" in widget.scorer.choices
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    scan = viewer.layers["MSLUB T1"]
    for name in ("reconstruction", "mask", "perceptual"):
        layer = viewer.layers[f"MSLUB T1 {name}"]
        assert layer.data.shape == scan.data.shape
        np.testing.assert_array_equal(layer.scale, scan.scale)
    mask = viewer.layers["MSLUB T1 mask"].data
    assert mask.min() >= 0 and mask.max() <= 1
    widget.model_choice.value = default_model_name()  # the DAE makes no such maps
    assert "phanes" not in widget.scorer.choices and widget.scorer.value == "residual-dark"


def test_export_names_keep_the_layers_whole_name_and_table_numbers_one_format():
    from napari_brain_uad._review import _row
    from napari_brain_uad._widget import file_name_of_layer
    from napari_brain_uad.session import Finding

    assert file_name_of_layer("AX T1 SE 3.0mm annotation") == "AX T1 SE 3.0mm annotation"
    assert file_name_of_layer('a/b:c*?"<>| annotation') == "a_b_c______ annotation"
    assert file_name_of_layer("...") == "mask"
    finding = Finding(number=1, voxels=10, volume_ml=0.0123456, mean_score=0.099, max_score=0.11023,
                      centre_voxel=(1.0, 2.0, 3.0), axial_slice=4, side="left", status="open")
    assert _row(finding)[2:5] == ["0.012", "0.0990", "0.1102"]


def test_a_re_run_refreshes_its_layers_in_place_and_keeps_how_the_user_shows_them(reviewed, qtbot):
    """A re-run gives the first run's layers their new data: the reader's choices on them (the
    reconstruction shown, the map's opacity) stay, and no layer is removed and added again."""
    viewer, widget = reviewed
    reconstruction, anomaly_map = viewer.layers["MSLUB T1 reconstruction"], viewer.layers["MSLUB T1 anomaly map"]
    proposal = viewer.layers["MSLUB T1 proposal"]
    reconstruction.visible, anomaly_map.opacity = True, 0.3
    before = {layer.name: layer.unique_id for layer in viewer.layers}
    old_map_data = anomaly_map.data
    run_and_wait(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert {layer.name: layer.unique_id for layer in viewer.layers} == before
    assert reconstruction.visible and anomaly_map.opacity == pytest.approx(0.3)
    assert anomaly_map.data is not old_map_data  # the new run's map
    assert anomaly_map.metadata["session"] is widget.review.session
    np.testing.assert_array_equal(proposal.data, widget.review._open_proposal_display())


def test_results_are_shown_from_the_event_loop_and_the_run_ends_after(qtbot):
    """Showing results waits for the event loop (one step a turn, so the window redraws between
    two layers: ``benchmarks/bench_viewer.py`` measures the longest freeze); what waits for the
    display (the run's end, a worklist's saving) comes after the last step; finishing (a new run,
    another scan, closing) completes the rest at once; a bug while showing never leaves the
    dock busy."""
    from qtpy.QtWidgets import QWidget

    from napari_brain_uad._result_layers import StagedDisplay

    parent = QWidget()
    qtbot.addWidget(parent)
    display, done = StagedDisplay(parent), []

    def steps(name):
        for part in range(3):
            done.append(f"{name}{part}")
            yield

    display.start(steps("a"))
    display.after(lambda: done.append("ended"))
    assert done == [] and display.pending  # nothing happens before the event loop turns
    qtbot.waitUntil(lambda: not display.pending)
    assert done == ["a0", "a1", "a2", "ended"]
    display.start(steps("b"))
    display.after(lambda: done.append("ended again"))
    display.finish()
    assert done[4:] == ["b0", "b1", "b2", "ended again"] and not display.pending

    def broken():
        yield
        raise RuntimeError("a bug while showing")

    display.start(broken())
    display.after(lambda: done.append("ended after the bug"))
    display.finish()  # the bug is logged; the dock is never left busy
    assert done[-1] == "ended after the bug" and not display.pending
