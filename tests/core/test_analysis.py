"""The whole data flow for one scan (analysis.analyse_scan) on real scans of two geometries.

To check the pipeline rather than a model, most tests use a reference "model" that returns the
lesion-free scan: then the residual is exactly the lesion we insert, and the mask that comes
back on the scan's own grid must sit on it. A real (small, untrained) DDPM checks the rest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.metrics import dice
from napari_brain_uad.models import DDPM, DDPMConfig, ReconstructionModel
from napari_brain_uad.preprocess import to_model_space
from napari_brain_uad.reconstruct import Cancelled

from conftest import SHARED_DATA, NoConfig

CASES = {
    "mslub-las-1mm": ("mslub/patient26/T1.nii.gz", None),
    "ixi-psr-2mm": ("ixi_t1/IXI661-HH-2788_T1.nii.gz", "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz"),
}


class HealthyReference(ReconstructionModel):
    """Returns, for each input slice, the closest slice of a known lesion-free volume: a perfect
    pseudo-healthy reconstruction, so the pipeline's geometry can be checked exactly."""

    kind = "healthy-reference"
    config_class = NoConfig

    def __init__(self, healthy_model_space: np.ndarray):
        super().__init__(NoConfig())
        self.healthy = torch.from_numpy(np.moveaxis(healthy_model_space, 2, 0)[:, None].copy())
        self.calls = 0

    def reconstruct(self, slices, t=None, generator=None):
        self.calls += 1
        distance = (slices[:, None] - self.healthy[None]).abs().flatten(2).mean(-1)  # (B, Z)
        return self.healthy[distance.argmin(dim=1)]


def with_lesion(scan, brain, radius_mm=12.0):
    """A copy of ``scan`` with a bright sphere in the brain, and the sphere's native mask."""
    centre = np.round(np.mean(np.nonzero(brain), axis=1)).astype(int)
    centre[0] += 5  # off the midline
    grid = np.indices(scan.data.shape).reshape(3, -1).T - centre
    distance = np.linalg.norm(grid * np.asarray(scan.geometry.spacing), axis=1).reshape(scan.data.shape)
    lesion = (distance <= radius_mm) & brain
    data = scan.data.astype(np.float32).copy()
    data[lesion] += 0.8 * np.percentile(scan.data[brain], 99)
    return dataclasses.replace(scan, data=data), lesion


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    scan_path, mask_path = CASES[request.param]
    if not (SHARED_DATA / scan_path).is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    scan = read_nifti(SHARED_DATA / scan_path)
    mask = read_nifti(SHARED_DATA / mask_path) if mask_path else None
    brain = mask.data > 0 if mask is not None else scan.data != 0
    lesioned, lesion = with_lesion(scan, brain)
    # The lesion-free scan in the model space the lesioned scan will get (same crop and
    # intensity mapping), so the reference reconstruction differs only by the lesion.
    lesioned_space = to_model_space(lesioned, brain_mask=mask)
    healthy = lesioned_space.transform.to_model(scan.data, antialias=True)
    healthy = np.clip((healthy - lesioned_space.transform.intensity_low)
                      / (lesioned_space.transform.intensity_high - lesioned_space.transform.intensity_low), 0, 1)
    healthy = np.where(lesioned_space.brain_mask, healthy, 0).astype(np.float32)
    return request.param, scan, lesioned, mask, lesion, HealthyReference(healthy)


def test_the_mask_lands_on_the_inserted_lesion_on_the_scans_own_grid(case):
    name, scan, lesioned, mask, lesion, reference = case
    result = analyse_scan(lesioned, reference, brain_mask=mask,
                          settings=AnalysisSettings(scorer="residual", device="cpu"))
    for array in (result.anomaly_map, result.reconstruction, result.filtered.values, result.brain_mask):
        assert array.shape == scan.data.shape
    assert not result.anomaly_map[~result.brain_mask].any()
    # Outside the brain the reconstruction is the scan itself.
    np.testing.assert_array_equal(result.reconstruction[~result.brain_mask], lesioned.data[~result.brain_mask])
    low, high = result.filtered.score_range()
    # The 5³ median (in 2 mm model space) rounds the sphere off; at a low threshold the mask
    # and the inserted sphere agree to Dice ≈ 0.85 (IXI, 2 mm) and 0.95 (MSLUB, 1 mm).
    found = result.mask_at(low + 0.1 * (high - low))
    assert dice(found, lesion) > 0.8, name
    findings = result.findings(low + 0.1 * (high - low))
    assert len(findings) == 1  # one lesion inserted, one finding
    centre = np.asarray(findings[0]["centre_voxel"])
    assert np.linalg.norm((centre - np.mean(np.nonzero(lesion), axis=1)) * scan.geometry.spacing) < 4.0  # mm


def test_a_higher_threshold_gives_a_smaller_mask_without_rerunning_anything(case):
    _, _, lesioned, mask, _, reference = case
    result = analyse_scan(lesioned, reference, brain_mask=mask, settings=AnalysisSettings(scorer="residual", device="cpu"))
    low, high = result.filtered.score_range()
    sizes = [int(result.mask_at(low + f * (high - low)).sum()) for f in (0.1, 0.3, 0.6, 0.9)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    small_dropped = result.mask_at(low + 0.3 * (high - low), min_size_ml=1e6)
    assert not small_dropped.any()  # every component is smaller than 1,000 L


def test_the_median_switch_redoes_only_the_post_processing(case):
    _, _, lesioned, mask, _, reference = case
    settings = AnalysisSettings(scorer="residual", device="cpu")
    with_median = analyse_scan(lesioned, reference, brain_mask=mask, settings=settings)
    without = analyse_scan(lesioned, reference, brain_mask=mask,
                           settings=dataclasses.replace(settings, median=False))
    calls = reference.calls
    switched = with_median.with_median(False)
    assert reference.calls == calls  # the model did not run again
    assert switched.reconstruction_model_space is with_median.reconstruction_model_space and not switched.filtered.median
    np.testing.assert_array_equal(switched.filtered.values, without.filtered.values)
    assert not np.array_equal(switched.filtered.values, with_median.filtered.values)
    assert switched.with_median(True).filtered.median and with_median.with_median(True) is with_median


@pytest.fixture(scope="module")
def small_ddpm():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16))
    with torch.no_grad():  # MONAI zero-initialises the output layer; make the output depend on the input
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def mslub():
    path = SHARED_DATA / "mslub/patient26/T1.nii.gz"
    if not path.is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA}")
    return read_nifti(path)


def test_samples_give_a_spread_map_and_mahalanobis_scores(small_ddpm, mslub):
    settings = AnalysisSettings(scorer="mhd-full", samples=2, noise_levels=(250, 500), device="cpu")
    result = analyse_scan(mslub, small_ddpm, settings=settings)
    assert result.spread_model_space is not None and result.spread_model_space.shape == result.score_model_space.shape
    assert result.spread is not None and result.spread.shape == mslub.data.shape
    assert result.spread[result.brain_mask].mean() > 0 and not result.spread[~result.brain_mask].any()
    assert np.isfinite(result.anomaly_map).all() and result.anomaly_map.max() > 0


def test_the_same_settings_give_the_same_map_and_progress_reaches_the_end(small_ddpm, mslub):
    reports = []
    first = analyse_scan(mslub, small_ddpm, settings=AnalysisSettings(device="cpu"),
                         progress=lambda fraction, stage: reports.append((fraction, stage)))
    second = analyse_scan(mslub, small_ddpm, settings=AnalysisSettings(device="cpu"))
    np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"model space", "reconstruction", "scoring", "post-processing", "native grid"} <= {s for _, s in reports}


def test_cancel_stops_the_analysis(small_ddpm, mslub):
    reports = []
    with pytest.raises(Cancelled):
        analyse_scan(mslub, small_ddpm, settings=AnalysisSettings(device="cpu", batch_size=4),
                     progress=lambda fraction, stage: reports.append(stage),
                     cancelled=lambda: reports.count("reconstruction") >= 3)
    assert "scoring" not in reports


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(scorer="mhd-full", samples=1), "at least 2 samples"),
        (dict(scorer="nonsense"), "unknown scorer"),
        (dict(scorer="ssim", scorer_parameters={"reg": 1}), "does not take reg"),
        (dict(samples=0), "at least 1"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message):
        AnalysisSettings(**settings)


def test_mahalanobis_with_a_model_whose_samples_never_differ_is_refused_before_any_work(mslub):
    from napari_brain_uad.models import DAE, DAEConfig

    with pytest.raises(ValueError, match="reconstructs the same way every time"):
        analyse_scan(mslub, DAE(DAEConfig()), settings=AnalysisSettings(scorer="mhd-diag", samples=10))


def test_several_scorers_from_one_reconstruction_give_each_scorers_own_analysis(small_ddpm, mslub):
    """What a benchmark comparing scorers runs: one brain, one model space, the network once for
    scorers of the same reconstruction; each map is the one analyse_scan gives for that scorer."""
    from napari_brain_uad.analysis import analyses_in_model_space
    from napari_brain_uad.brain_mask import find_brain

    calls = []
    original = small_ddpm.reconstruct
    small_ddpm.reconstruct = lambda *arguments, **keywords: calls.append(1) or original(*arguments, **keywords)
    try:
        brain = find_brain(mslub)
        volume = to_model_space(mslub, brain_mask=brain.mask, spec=small_ddpm.spec)
        settings = {scorer: AnalysisSettings(scorer=scorer, device="cpu") for scorer in ("residual", "ssim")}
        analyses = analyses_in_model_space(mslub, volume, brain, small_ddpm, settings)
        batches_for_both = len(calls)
        calls.clear()
        alone = analyse_scan(mslub, small_ddpm, settings=settings["ssim"])
    finally:
        del small_ddpm.reconstruct
    assert batches_for_both == len(calls) > 0  # the network ran once for the two scorers
    np.testing.assert_array_equal(analyses["ssim"].filtered.values, alone.filtered.values)
    assert not np.array_equal(analyses["residual"].filtered.values, analyses["ssim"].filtered.values)


class HealthyReferenceWithMaps(HealthyReference):
    """The reference "model" of a kind with extra maps (SADM's segmentation, PHANES's perceptual
    map): each map is 1 on a square in one model-space slice only, 0 elsewhere."""

    extra_maps = ("segmentation", "perceptual")

    def __init__(self, healthy_model_space: np.ndarray, marked_slice: int):
        super().__init__(healthy_model_space)
        self.marked_slice = marked_slice

    def reconstruct_with_maps(self, slices, t=None, generator=None):
        distance = (slices[:, None] - self.healthy[None]).abs().flatten(2).mean(-1)
        index = distance.argmin(dim=1)
        marked = torch.zeros_like(slices)
        marked[index == self.marked_slice] = 1.0
        return self.healthy[index], {"segmentation": marked, "perceptual": marked}


def test_sadms_segmentation_is_added_after_the_median_so_a_one_slice_region_survives(case):
    """The paper median-filters the unsupervised map only: a segmented region one slice thick
    would vanish under a 5³ median of the sum."""
    _, scan, _, mask, _, reference = case
    volume = to_model_space(scan, brain_mask=mask)
    centre = int(np.round(np.mean(np.nonzero(volume.brain_mask)[2])))
    model = HealthyReferenceWithMaps(reference.healthy[:, 0].permute(1, 2, 0).numpy(), centre)
    settings = AnalysisSettings(scorer="residual+segmentation", device="cpu")
    assert settings.median  # the median is on: for the residual part only
    result = analyse_scan(scan, model, brain_mask=mask, settings=settings)
    model_values = result.score_model_space
    assert model_values[..., centre].max() >= 1.0 and not model_values[..., centre + 3].max() >= 1.0
    # After post-processing the one-slice region still scores about 1 (segmentation 1 + residual
    # ≥ 0; on a 1 mm grid, interpolation from the 2 mm slab blurs it to no less than half).
    assert result.filtered.values.max() > 0.6
    assert result.mask_at(0.5).sum() > 0
    # The same map with the median over the whole sum loses it.
    from napari_brain_uad.postprocess import prepare
    whole = prepare(model_values, volume.brain_mask)
    assert whole.values.max() < 0.3


def test_phanes_map_is_used_as_it_is_neither_median_filtered_nor_eroded(case):
    _, scan, lesioned, mask, lesion, reference = case
    volume = to_model_space(lesioned, brain_mask=mask)
    centre = int(np.round(np.mean(np.nonzero(volume.transform.to_model(lesion.astype(np.float32)) > 0.5)[2])))
    model = HealthyReferenceWithMaps(reference.healthy[:, 0].permute(1, 2, 0).numpy(), centre)
    settings = AnalysisSettings(scorer="phanes", device="cpu")
    assert settings.median is False  # the scorer's rule when the user does not choose
    result = analyse_scan(lesioned, model, brain_mask=mask, settings=settings)
    assert not result.filtered.median and result.filtered.iterations == 0
    # No erosion: the region is the whole brain; no median: the model-space map is the score.
    np.testing.assert_array_equal(result.filtered.region, result.brain_mask)
    assert result.score_model_space[..., centre].max() > 0 and not result.score_model_space[..., centre + 3].any()
    unfiltered = result.model_space.transform.to_native(result.score_model_space)
    region = result.filtered.region
    np.testing.assert_allclose(result.filtered.values[region], unfiltered[region], atol=1e-6)
    # The one-slice-thick product |x − x̂|·S survives thresholding; a user can still switch the median on.
    assert result.mask_at(0.5 * result.filtered.values.max()).sum() > 0
    assert result.with_median(True).filtered.values.max() < 0.5 * result.filtered.values.max()
