"""One scan's session (session.ScanSession), Qt-free, on a real scan with an inserted lesion.

The "model" reconstructs every slice as empty, so the residual is the scan itself and the
bright sphere inserted into the brain scores highest; it counts its calls, so a test can show
that nothing a user does on a session runs the network again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.evaluation import evaluate_analysis
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.models import ReconstructionModel
from napari_brain_uad.session import REJECTED, ScanSession

from conftest import SHARED_DATA, NoConfig

SCAN = "ixi_t1/IXI661-HH-2788_T1.nii.gz"
BRAIN = "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz"


class EmptyReconstruction(ReconstructionModel):
    kind = "empty-reconstruction"
    config_class = NoConfig

    def __init__(self):
        super().__init__(NoConfig())
        self.calls = 0

    def reconstruct(self, slices, t=None, generator=None):
        self.calls += 1
        return torch.zeros_like(slices)


@pytest.fixture(scope="module")
def analysed():
    """(analysis, model, lesion mask on the scan's grid) for a scan with a 10 mm bright sphere."""
    if not (SHARED_DATA / SCAN).is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    scan, brain = read_nifti(SHARED_DATA / SCAN), read_nifti(SHARED_DATA / BRAIN)
    inside = brain.data > 0
    centre = np.round(np.mean(np.nonzero(inside), axis=1)).astype(int) + (6, 0, 0)  # off the midline
    offsets = (np.indices(scan.data.shape).reshape(3, -1).T - centre) * np.asarray(scan.geometry.spacing)
    lesion = (np.linalg.norm(offsets, axis=1).reshape(scan.data.shape) <= 10.0) & inside
    data = scan.data.astype(np.float32).copy()
    data[lesion] += np.percentile(scan.data[inside], 99)
    model = EmptyReconstruction()
    analysis = analyse_scan(dataclasses.replace(scan, data=data), model, brain_mask=brain,
                            settings=AnalysisSettings(scorer="residual", device="cpu"))
    return analysis, model, lesion


def card(thresholds: dict[str, float], scorer: str = "residual") -> dict:
    """A model card with these thresholds, calibrated for ``scorer``."""
    return {"kind": "empty-reconstruction", "default_scorer": "residual",
            "thresholds": {name: {"value": value, "scorer": scorer} for name, value in thresholds.items()}}


def at(analysis, fraction: float) -> float:
    low, high = analysis.filtered.score_range()
    return low + fraction * (high - low)


def test_the_threshold_starts_at_the_models_healthy_threshold_when_the_map_reaches_it(analysed):
    analysis, _, _ = analysed
    healthy = at(analysis, 0.7)
    session = ScanSession.start(analysis, card({"lesions-dice": at(analysis, 0.2), "healthy-99": healthy}))
    assert (session.threshold, session.preset) == (healthy, "healthy-99")
    assert session.threshold_range == analysis.filtered.score_range()
    assert session.min_size_ml == analysis.default_min_size_ml  # the papers' 7 model voxels
    assert ScanSession.start(analysis, card({}), min_size_ml=0.5).min_size_ml == 0.5


@pytest.mark.parametrize("thresholds, scorer", [
    ({"healthy-99": 1e6}, "residual"),  # beyond every score of this map
    ({}, "residual"),  # the model stores none
    ({"healthy-99": 0.5}, "ssim"),  # calibrated for another scorer
])
def test_otherwise_it_starts_in_the_middle_of_the_maps_scores(analysed, thresholds, scorer):
    analysis, _, _ = analysed
    session = ScanSession.start(analysis, card(thresholds, scorer))
    assert session.threshold == pytest.approx(at(analysis, 0.5)) and session.preset is None


def test_a_preset_outside_the_maps_scores_is_clamped_with_a_message(analysed):
    analysis, _, _ = analysed
    low, high = analysis.filtered.score_range()
    session = ScanSession.start(analysis, card({"healthy-99": at(analysis, 0.5), "strict": high + 1.0,
                                                "lesions-dice": at(analysis, 0.3)}))
    assert set(session.presets) == {"healthy-99", "strict", "lesions-dice"}
    message = session.apply_preset("strict")
    assert "outside this map's scores" in message
    assert (session.threshold, session.preset) == (high, "strict")
    assert session.apply_preset("lesions-dice") is None and session.threshold == at(analysis, 0.3)
    assert "not calibrated" in session.apply_preset("another-model's")
    assert session.threshold == at(analysis, 0.3)  # unchanged
    session.set_threshold(at(analysis, 0.4))
    assert session.preset is None  # the user's own threshold now


def test_the_proposed_mask_follows_the_threshold_without_running_the_network(analysed):
    analysis, model, lesion = analysed
    calls = model.calls
    session = ScanSession.start(analysis, card({}))
    sizes = []
    for fraction in (0.2, 0.5, 0.8):
        session.set_threshold(at(analysis, fraction))
        mask = session.proposed_mask()
        np.testing.assert_array_equal(mask, analysis.mask_at(session.threshold, session.min_size_ml))
        sizes.append(int(mask.sum()))
    assert sizes[0] > sizes[1] > sizes[2] > 0
    assert session.findings()[0]["volume_ml"] > 0  # the sphere is found
    session.min_size_ml = 1e6  # no finding is this large
    assert not session.proposed_mask().any() and session.findings() == []
    assert session.analysis is analysis and model.calls == calls


def test_the_median_switch_keeps_the_threshold_and_minimum_size(analysed):
    analysis, model, _ = analysed
    calls = model.calls
    session = ScanSession.start(analysis, card({"healthy-99": at(analysis, 0.6)}), min_size_ml=0.3)
    switched = session.with_median(False)
    assert (switched.threshold, switched.min_size_ml, switched.preset) == (at(analysis, 0.6), 0.3, "healthy-99")
    assert not switched.analysis.filtered.median and switched.analysis.reconstruction_model_space is analysis.reconstruction_model_space
    assert session.analysis is analysis and model.calls == calls  # the original is untouched, nothing re-ran
    np.testing.assert_array_equal(switched.proposed_mask(),
                                  switched.analysis.mask_at(switched.threshold, switched.min_size_ml))


def test_evaluation_gives_brain_uad_evaluates_numbers(analysed):
    analysis, _, lesion = analysed
    session = ScanSession.start(analysis, card({}), min_size_ml=0.1)
    session.set_threshold(at(analysis, 0.6))
    ours = session.evaluate(lesion)
    cli = evaluate_analysis(analysis, lesion, threshold=session.threshold, min_size_ml=0.1)
    assert ours.row() == cli.row()
    assert ours.best_dice > 0.5  # the inserted sphere is what the map ranks highest
    other = session.evaluate(lesion, threshold=at(analysis, 0.3))
    assert other.row() == evaluate_analysis(analysis, lesion, threshold=at(analysis, 0.3), min_size_ml=0.1).row()


# ---------------------------------------------------------------- reviewing the findings


@pytest.fixture(scope="module")
def two_spheres():
    """A synthetic head at 2 mm (RAS): an ellipsoid brain of about 1 L with a 12 mm bright
    sphere 35 mm to the patient's right of its centre and an 8 mm one 35 mm to the left."""
    import nibabel as nib

    from napari_brain_uad.nifti import NiftiGeometry, NiftiVolume

    shape = (80, 96, 72)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + 1.0  # the grid's centre at the scanner's origin
    world = np.moveaxis(np.indices(shape).astype(float), 0, -1) * 2.0 + affine[:3, 3]
    brain = (((world / [60.0, 75.0, 55.0]) ** 2).sum(axis=-1) <= 1.0)
    # Tissue brightening smoothly from the feet to the top of the head: after the percentile
    # normalisation only the top of the brain competes with the spheres, as one midline finding.
    data = np.where(brain, 75.0 + world[..., 2] / 2.2, 0.0).astype(np.float32)
    spheres = {}
    for side, shift, radius in (("right", 35.0, 12.0), ("left", -35.0, 8.0)):  # RAS: +x is the right
        spheres[side] = np.linalg.norm(world - [shift, 0.0, 0.0], axis=-1) <= radius
        data[spheres[side]] = 300.0
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    scan = NiftiVolume(data, NiftiGeometry(source="synthetic head", affine=affine, shape=shape, header=header))
    analysis = analyse_scan(scan, EmptyReconstruction(), brain_mask=brain,
                            settings=AnalysisSettings(scorer="residual", median=False, device="cpu"))
    return analysis, spheres


def reviewing(two_spheres) -> ScanSession:
    analysis, _ = two_spheres
    session = ScanSession.start(analysis, card({}))
    session.set_threshold(at(analysis, 0.9))
    return session


def by_side(findings, side: str):
    """The finding on one side (the spheres are the only findings off the midline)."""
    (finding,) = [f for f in findings if f.side == side]
    return finding


def test_findings_say_where_they_are_and_start_open(two_spheres):
    analysis, spheres = two_spheres
    findings = reviewing(two_spheres).review()
    assert sorted(f.side for f in findings) == ["left", "midline", "right"]
    assert all(f.status == "open" for f in findings)
    assert [f.number for f in findings] == [1, 2, 3] and findings[0].volume_ml >= findings[1].volume_ml
    geometry = analysis.scan.geometry
    for side in ("right", "left"):
        finding = by_side(findings, side)
        assert finding.volume_ml == pytest.approx(spheres[side].sum() * 0.008, rel=0.2)
        expected = geometry.source_index_to_display_index(np.argwhere(spheres[side]).mean(axis=0))[0]
        assert abs(finding.axial_slice - expected) <= 1  # napari's axial slider lands on it


def test_accepting_and_rejecting_survive_the_slider(two_spheres):
    analysis, spheres = two_spheres
    session = reviewing(two_spheres)
    annotation = np.zeros(analysis.scan.data.shape, bool)
    findings = session.review(annotation)
    annotation |= session.accept(by_side(findings, "right").number)  # the widget adds these voxels
    annotation &= ~session.reject(by_side(findings, "left").number)
    statuses = {f.side: f.status for f in session.review(annotation)}
    assert statuses == {"right": "accepted", "left": "rejected", "midline": "open"}
    assert np.array_equal(annotation, spheres["right"])
    open_proposal = session.open_proposal(annotation) > 0
    assert not (open_proposal & (spheres["right"] | spheres["left"])).any() and open_proposal.any()
    # The slider moves: the findings are recomputed and renumbered, the decisions stay.
    session.set_threshold(at(analysis, 0.8))
    statuses = {f.side: f.status for f in session.review(annotation)}
    assert statuses["right"] == "accepted" and statuses["left"] == "rejected"
    # A change of mind: the rejected one accepted after all.
    annotation |= session.accept(by_side(session.review(annotation), "left").number)
    assert by_side(session.review(annotation), "left").status == "accepted" and not session.rejected.any()


def test_the_open_proposal_leaves_out_what_the_user_drew(two_spheres):
    analysis, spheres = two_spheres
    session = reviewing(two_spheres)
    drawn = spheres["left"].copy()  # the user painted the left sphere themselves
    proposal = session.open_proposal(drawn) > 0
    assert not (proposal & drawn).any() and proposal[spheres["right"]].all()
    # The widget's mask is the annotation layer's voxels, stored in the display's axis order.
    stored_for_display = np.ascontiguousarray(drawn.transpose(2, 1, 0)[::-1]).astype(np.uint8)
    np.testing.assert_array_equal(session.open_proposal(stored_for_display[::-1].transpose(2, 1, 0)) > 0, proposal)
    statuses = {f.side: f.status for f in session.review(drawn)}
    assert statuses == {"right": "open", "left": "accepted", "midline": "open"}


def test_a_rerun_keeps_the_users_rejections_and_own_threshold_but_nothing_crosses_scans_or_scales(two_spheres,
                                                                                                    analysed):
    """The rule of what a re-run keeps: the same scan's rejected voxels, and the user's own
    threshold when the new map is on the same scale; a preset stays a preset; another scan or
    another scorer's map starts afresh."""
    analysis, spheres = two_spheres
    before = reviewing(two_spheres)
    before.reject(by_side(before.review(), "right").number)
    rerun = ScanSession.start(analysis, card({}))
    rerun.carry_over(before)
    assert rerun.threshold == before.threshold and rerun.preset is None
    assert by_side(rerun.review(), "right").status == REJECTED
    # A preset chosen before is chosen again.
    with_presets = card({"healthy-99": at(analysis, 0.5), "healthy-95": at(analysis, 0.3)})
    chosen = ScanSession.start(analysis, with_presets)
    chosen.apply_preset("healthy-95")
    again = ScanSession.start(analysis, with_presets)
    assert again.preset == "healthy-99"
    again.carry_over(chosen)
    assert again.preset == "healthy-95" and again.threshold == pytest.approx(at(analysis, 0.3))
    # Another scorer's map is on another scale: the user's number means nothing there.
    other_scale = ScanSession.start(dataclasses.replace(analysis, settings=dataclasses.replace(
        analysis.settings, scorer="residual-bright")), card({}))
    start = other_scale.threshold
    other_scale.carry_over(before)
    assert other_scale.threshold == start and other_scale.rejected is not None  # the voxels still stand
    # Another scan: nothing carries over.
    other_scan = ScanSession.start(analysed[0], card({}))
    start = other_scan.threshold
    other_scan.carry_over(before)
    assert other_scan.threshold == start and other_scan.rejected is None


def test_an_accepted_finding_merged_into_a_larger_region_reads_partly_accepted_not_open(two_spheres):
    """Lowering the slider can merge an accepted finding into a larger region the user has not
    seen: it reads "partly accepted" (not "open", as if the decision were lost, nor "accepted",
    as if the new part had been seen); back at the threshold it was accepted at, "accepted"."""
    from napari_brain_uad.session import ACCEPTED, PART_ACCEPTED

    analysis, spheres = two_spheres
    session = reviewing(two_spheres)
    annotation = session.accept(by_side(session.review(), "right").number)
    threshold = session.threshold
    for fraction in np.linspace(0.85, 0.0, 18):  # down until the sphere's finding holds more than the sphere
        session.set_threshold(at(analysis, fraction))
        holding = [f for f in session.review(annotation)
                   if session.finding_mask(f.number)[spheres["right"]].any()]
        if holding and holding[0].voxels > 1.5 * spheres["right"].sum():
            break
    else:
        raise AssertionError("no threshold grows the right sphere's finding")
    assert holding[0].status == PART_ACCEPTED
    session.set_threshold(threshold)
    assert by_side(session.review(annotation), "right").status == ACCEPTED
