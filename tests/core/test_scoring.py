"""Anomaly scorers against independent references: skimage's SSIM, an explicit dense inverse of
the P×P covariance, scipy's Gaussian filter, and formulas written out by hand."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_brain_uad import scoring
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.preprocess import to_model_space

SCORER_NAMES = ("residual", "residual-dark", "residual-bright", "ssim", "ssim-ens", "mhd-diag", "mhd-full",
                "mhd-full-ssim", "mhd-diag-ssim", "s-mean", "ssim+segmentation", "residual+segmentation", "phanes")


# --------------------------------------------------------------------------- data


def _smooth_field(rng, shape, sigma=1.5):
    return ndimage.gaussian_filter(rng.random(shape), sigma)


def _pair(shape, seed=0):
    """A smooth image and a noisy, slightly blurred copy of it, float64."""
    rng = np.random.default_rng(seed)
    image = _smooth_field(rng, shape)
    reference = ndimage.gaussian_filter(image, 0.7) + 0.03 * rng.standard_normal(shape)
    return image, reference


def _samples_around(image, n_samples, seed=1, amplitude=0.2):
    """N "reconstructions" of ``image``: the image plus spatially correlated noise, and an image
    with a bright square the samples do not have (an anomaly)."""
    rng = np.random.default_rng(seed)
    noise = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(image.shape), 1.5, axes=(0, 1)) for _ in range(n_samples)]
    )
    samples = image[None] + amplitude * noise
    anomalous = image + 0.01 * rng.standard_normal(image.shape)
    h, w = image.shape[:2]
    anomalous[h // 3 : h // 3 + 6, w // 2 : w // 2 + 6] += 0.5
    return anomalous, samples


@functools.lru_cache(maxsize=1)
def _mslub_model_space(path: str):
    model = to_model_space(read_nifti(Path(path)))
    return model.image, model.brain_mask


@pytest.fixture
def mslub(shared_data):
    """MSLUB patient 26 T1 in model space: float32 (96, 96, Z) in [0, 1] and its brain mask."""
    return _mslub_model_space(str(shared_data / "mslub/patient26/T1.nii.gz"))


def _skimage_ssim(a, b, sigma, data_range):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=data_range, full=True
    )[1]


def _dense_mahalanobis(image, samples, mask, reg, covariance="full"):
    """The reference method: invert the dense P×P regularised covariance of each slice."""
    image = np.asarray(image, np.float64)
    samples = np.asarray(samples, np.float64)
    mask = np.ones(image.shape, bool) if mask is None else np.asarray(mask, bool)
    squeeze = image.ndim == 2
    if squeeze:
        image, samples, mask = image[..., None], samples[..., None], mask[..., None]
    out = np.zeros(image.shape)
    for k in range(image.shape[2]):
        inside = mask[:, :, k]
        if inside.sum() < 2:
            continue
        pixels = samples[:, :, :, k][:, inside]  # (N, P)
        d = image[:, :, k][inside] - pixels.mean(axis=0)
        if covariance == "full":
            sigma = np.cov(pixels, rowvar=False) + reg * np.eye(inside.sum())
        else:
            sigma = np.diag(pixels.var(axis=0, ddof=1) + reg)
        out[:, :, k][inside] = np.sqrt(np.maximum(0, d * (np.linalg.inv(sigma) @ d)))
    return out[..., 0] if squeeze else out


def _smoothed(score, mask, sigma):
    """In-plane Gaussian smoothing per slice with scipy, then 0 outside the mask."""
    axes = (0, 1)
    smooth = ndimage.gaussian_filter(score, sigma, axes=axes, mode="reflect", truncate=4.0)
    return smooth if mask is None else smooth * mask


# --------------------------------------------------------------------------- residual


def test_residual_is_absolute_difference_and_zero_outside_mask():
    image, reference = _pair((20, 24))
    np.testing.assert_allclose(scoring.residual(image, reference), np.abs(image - reference), atol=0)
    mask = np.zeros(image.shape, bool)
    mask[5:15, 5:15] = True
    masked = scoring.residual(image, reference, mask=mask)
    assert np.all(masked[~mask] == 0)
    np.testing.assert_allclose(masked[mask], np.abs(image - reference)[mask])


# --------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("shape", [(48, 40), (30, 28, 26)], ids=["2d", "3d"])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.7])
def test_ssim_map_equals_skimage_on_synthetic(shape, sigma):
    image, reference = _pair(shape)
    data_range = image.max() - image.min()
    expected = _skimage_ssim(image, reference, sigma, data_range)
    ours = scoring.ssim_map(image, reference, sigma=sigma)  # default data_range = max - min of image
    # Borders are mirrored like scipy's 'reflect', so the maps agree everywhere, border included;
    # the contract (1e-3) is for the interior, checked separately.
    radius = int(3.5 * sigma + 0.5)
    interior = tuple(slice(radius, n - radius) for n in shape)
    assert np.abs(ours[interior] - expected[interior]).max() < 1e-3
    np.testing.assert_allclose(ours, expected, atol=1e-9)


def test_ssim_window_size_follows_the_papers_rule():
    for sigma in scoring.SSIM_ENS_SIGMAS:
        kernel = scoring.gaussian_kernel(sigma)
        assert kernel.numel() == int(3.5 * sigma + 0.5) * 2 + 1
        assert math.isclose(float(kernel.sum()), 1.0, rel_tol=1e-12)


def test_ssim_map_equals_skimage_on_real_scan(mslub):
    image, brain = mslub
    blurred = ndimage.gaussian_filter(image, 1.0).astype(np.float32)
    data_range = float(image.max() - image.min())
    radius = int(3.5 * 1.0 + 0.5)
    # 3D: the whole model-space volume, as the reference code scores it.
    expected = _skimage_ssim(image.astype(np.float64), blurred.astype(np.float64), 1.0, data_range)
    ours = scoring.ssim_map(image, blurred, sigma=1.0)
    assert ours.dtype == np.float32 and ours.shape == image.shape
    interior = (slice(radius, -radius),) * 3
    assert np.abs(ours[interior] - expected[interior]).max() < 1e-3
    assert np.abs(ours - expected).max() < 1e-5
    # 2D: the axial slice with the most brain, at another window spread.
    k = int(brain.sum(axis=(0, 1)).argmax())
    a, b = image[:, :, k], blurred[:, :, k]
    expected_2d = _skimage_ssim(a.astype(np.float64), b.astype(np.float64), 1.5, data_range)
    ours_2d = scoring.ssim_map(a, b, sigma=1.5, data_range=data_range)
    assert np.abs(ours_2d - expected_2d).max() < 1e-5
    # And against skimage computing in float32 itself (its own rounding is the larger error).
    expected_32 = _skimage_ssim(a, b, 1.5, data_range)
    r = int(3.5 * 1.5 + 0.5)
    assert np.abs(ours_2d - expected_32)[r:-r, r:-r].max() < 1e-3


def test_ssim_map_mask_sets_one_outside_and_leaves_inside_unchanged():
    image, reference = _pair((32, 32, 12))
    mask = np.zeros(image.shape, bool)
    mask[8:24, 6:26, 2:10] = True
    plain = scoring.ssim_map(image, reference)
    masked = scoring.ssim_map(image, reference, mask=mask)
    assert np.all(masked[~mask] == 1)
    np.testing.assert_array_equal(masked[mask], plain[mask])


def test_ssim_data_range_default_and_constant_image():
    image, reference = _pair((24, 24))
    np.testing.assert_array_equal(
        scoring.ssim_map(image, reference), scoring.ssim_map(image, reference, data_range=image.max() - image.min())
    )
    zeros = np.zeros((16, 16))
    # A constant image has no range: R = 1, and identical images are perfectly similar.
    np.testing.assert_allclose(scoring.ssim_map(zeros, zeros), 1.0)
    np.testing.assert_array_equal(scoring.ssim_map(zeros, reference[:16, :16]),
                                  scoring.ssim_map(zeros, reference[:16, :16], data_range=1.0))


@pytest.mark.parametrize("shape", [(40, 36), (28, 28, 20)], ids=["2d", "3d"])
def test_ssim_ens_is_softmax_weighted_ssim(shape):
    image, reference = _pair(shape, seed=3)
    sigmas = scoring.SSIM_ENS_SIGMAS
    assert sigmas == (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7)
    maps = np.stack([scoring.ssim_map(image, reference, sigma=s) for s in sigmas])
    weights = np.exp(-maps) / np.exp(-maps).sum(axis=0)
    expected = 1 - (weights * maps).sum(axis=0)
    np.testing.assert_allclose(scoring.ssim_ens(image, reference), expected, atol=1e-12)
    # Each member also equals skimage, so the ensemble is checked against it indirectly.
    for sigma, member in zip((0.3, 1.7), (maps[0], maps[-1])):
        np.testing.assert_allclose(member, _skimage_ssim(image, reference, sigma, image.max() - image.min()), atol=1e-9)
    mask = np.zeros(shape, bool)
    mask[5:-5, 5:-5] = True
    masked = scoring.ssim_ens(image, reference, mask=mask)
    assert np.all(masked[~mask] == 0)
    np.testing.assert_allclose(masked[mask], expected[mask], atol=1e-12)


def test_ssim_ens_on_real_scan_ranks_a_lesion_above_healthy_tissue(mslub):
    image, brain = mslub
    k = int(brain.sum(axis=(0, 1)).argmax())
    volume = image[:, :, k - 5 : k + 5]
    mask = brain[:, :, k - 5 : k + 5]
    reconstruction = ndimage.gaussian_filter(volume, 0.8)
    anomalous = volume.copy()
    anomalous[40:48, 40:48, 3:7] = np.where(mask[40:48, 40:48, 3:7], 1.0, 0.0)  # a bright "lesion"
    score = scoring.ssim_ens(anomalous, reconstruction, mask=mask)
    assert score.dtype == np.float32
    lesion = np.zeros(mask.shape, bool)
    lesion[40:48, 40:48, 3:7] = True
    assert score[lesion & mask].mean() > 3 * score[~lesion & mask].mean()


# --------------------------------------------------------------------------- Mahalanobis


@functools.lru_cache(maxsize=1)
def _slice_case():
    rng = np.random.default_rng(7)
    image = _smooth_field(rng, (64, 64), 2.0)
    anomalous, samples = _samples_around(image, 10)
    dense = _dense_mahalanobis(anomalous, samples, None, 1e-2)  # one 4096 × 4096 inverse
    return anomalous, samples, dense


def test_mahalanobis_full_equals_dense_inverse_on_a_64x64_slice():
    anomalous, samples, dense = _slice_case()
    ours = scoring.mahalanobis(anomalous, samples, covariance="full", reg=1e-2, smooth_sigma=0)
    assert np.abs(ours - dense).max() <= 1e-3 * dense.max()
    # The anomaly stands out: the distance sums to d^T Σ^-1 d and peaks in the square.
    peak = np.unravel_index(np.argmax(ours), ours.shape)
    assert 21 <= peak[0] < 27 + 1 and 32 <= peak[1] < 38 + 1
    # Smoothing: scipy's gaussian_filter of the dense map.
    smoothed = scoring.mahalanobis(anomalous, samples, covariance="full", reg=1e-2, smooth_sigma=1.0)
    expected = _smoothed(dense, None, 1.0)
    assert np.abs(smoothed - expected).max() <= 1e-3 * expected.max()


@pytest.mark.parametrize("reg", [1e-2, 1e-5])
def test_mahalanobis_full_equals_dense_inverse_on_a_masked_volume(reg):
    rng = np.random.default_rng(11)
    image = _smooth_field(rng, (28, 30, 5), 2.0)
    anomalous, samples = _samples_around(image, 10, seed=12, amplitude=0.1)
    yy, xx = np.mgrid[:28, :30]
    mask = np.zeros(image.shape, bool)
    for k, radius in enumerate((12, 9, 6, 0, 0)):
        mask[:, :, k] = (yy - 14) ** 2 + (xx - 15) ** 2 < radius**2
    mask[14, 15, 3] = True  # one brain pixel: too few for a covariance, scores 0; slice 4 is empty
    dense = _dense_mahalanobis(anomalous, samples, mask, reg)
    ours = scoring.mahalanobis(anomalous, samples, mask=mask, covariance="full", reg=reg, smooth_sigma=0)
    assert np.abs(ours - dense).max() <= 1e-3 * dense.max()
    assert np.all(ours[:, :, 3:] == 0) and np.all(ours[~mask] == 0)
    smoothed = scoring.mahalanobis(anomalous, samples, mask=mask, covariance="full", reg=reg, smooth_sigma=1.0)
    expected = _smoothed(dense, mask, 1.0)
    assert np.abs(smoothed - expected).max() <= 1e-3 * expected.max()


def test_mahalanobis_full_on_real_scan_equals_dense_inverse(mslub):
    image, brain = mslub
    k = int(brain.sum(axis=(0, 1)).argmax())
    # A 40×40 window of three slices keeps the dense inverses small (P ≤ 1600).
    window = (slice(28, 68), slice(28, 68), slice(k - 1, k + 2))
    crop, mask = image[window].astype(np.float64), brain[window]
    rng = np.random.default_rng(5)
    samples = np.stack(
        [ndimage.gaussian_filter(crop + 0.05 * rng.standard_normal(crop.shape), 0.8, axes=(0, 1)) for _ in range(10)]
    )
    dense = _dense_mahalanobis(crop, samples, mask, 1e-2)
    ours = scoring.mahalanobis(crop.astype(np.float32), samples.astype(np.float32), mask=mask, smooth_sigma=0)
    assert ours.dtype == np.float32
    assert np.abs(ours - dense).max() <= 1e-3 * dense.max()


def test_mahalanobis_diag_equals_explicit_formula():
    rng = np.random.default_rng(2)
    image = _smooth_field(rng, (20, 22, 3))
    anomalous, samples = _samples_around(image, 6)
    mask = np.ones(image.shape, bool)
    mask[:3] = False
    d = anomalous - samples.mean(axis=0)
    expected = np.sqrt(d**2 / (samples.var(axis=0, ddof=1) + 0.05)) * mask
    ours = scoring.mahalanobis(anomalous, samples, mask=mask, covariance="diag", reg=0.05, smooth_sigma=0)
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    np.testing.assert_allclose(ours, _dense_mahalanobis(anomalous, samples, mask, 0.05, "diag"), atol=1e-10)
    smoothed = scoring.mahalanobis(anomalous, samples, mask=mask, covariance="diag", reg=0.05, smooth_sigma=1.3)
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(expected, 1.3, axes=(0, 1)) * mask, atol=1e-12)


def test_mahalanobis_of_a_volume_is_its_slices_scored_one_by_one():
    rng = np.random.default_rng(4)
    image = _smooth_field(rng, (24, 24, 4))
    anomalous, samples = _samples_around(image, 5)
    volume = scoring.mahalanobis(anomalous, samples)
    for k in range(4):
        one_slice = scoring.mahalanobis(anomalous[:, :, k], samples[:, :, :, k])
        np.testing.assert_allclose(volume[:, :, k], one_slice, atol=1e-12)


# --------------------------------------------------------------------------- combinations


def test_mhd_ssim_and_s_mean_compose_as_written():
    rng = np.random.default_rng(8)
    image = _smooth_field(rng, (26, 26, 8))
    anomalous, samples = _samples_around(image, 4, amplitude=0.05)
    mask = np.zeros(image.shape, bool)
    mask[3:-3, 3:-3] = True
    mean = samples.mean(axis=0)
    one_minus_ssim = 1 - scoring.ssim_map(anomalous, mean, sigma=1.0, mask=mask)
    np.testing.assert_allclose(scoring.s_mean(anomalous, samples, mask=mask), one_minus_ssim, atol=1e-12)
    for covariance in ("full", "diag"):
        mhd = scoring.mahalanobis(anomalous, samples, mask=mask, covariance=covariance)
        expected = mhd / mhd[mask].max() * one_minus_ssim
        combined = scoring.mhd_ssim(anomalous, samples, mask=mask, covariance=covariance)
        np.testing.assert_allclose(combined, expected, atol=1e-12)
        np.testing.assert_allclose(
            scoring.score(f"mhd-{covariance}-ssim", anomalous, samples, mask=mask), expected, atol=1e-12
        )
        assert np.all(combined[~mask] == 0)


def test_ensemble_mean_averages_over_noise_levels():
    rng = np.random.default_rng(9)
    members = [rng.random((8, 9, 3)).astype(np.float32) for _ in range(3)]
    expected = (members[0] + members[1] + members[2]) / 3
    np.testing.assert_allclose(scoring.ensemble_mean(members), expected, rtol=1e-6)
    np.testing.assert_allclose(scoring.ensemble_mean(np.stack(members)), expected, rtol=1e-6)
    as_tensor = scoring.ensemble_mean([torch.from_numpy(m) for m in members])
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        scoring.ensemble_mean([])
    with pytest.raises(ValueError, match="shape"):
        scoring.ensemble_mean([members[0], members[1][:4]])


# --------------------------------------------------------------------------- registry and kinds


def test_registry_lists_every_scorer_with_what_it_needs():
    assert tuple(scoring.SCORERS) == SCORER_NAMES
    for name, scorer in scoring.SCORERS.items():
        assert scorer.name == name and callable(scorer.fn) and scorer.description
        one = ("residual", "residual-dark", "residual-bright", "ssim", "ssim-ens", "ssim+segmentation",
               "residual+segmentation", "phanes")
        assert scorer.needs == ("reconstruction" if name in one else "samples")
    assert scoring.scorer_names("reconstruction") == ["residual", "residual-dark", "residual-bright", "ssim", "ssim-ens",
                                                      "ssim+segmentation", "residual+segmentation", "phanes"]
    # A model without a segmentation map is not offered SADM's scorer.
    assert "ssim+segmentation" not in scoring.scorer_names(maps=())
    assert "ssim+segmentation" in scoring.scorer_names(maps=("segmentation",))
    with pytest.raises(TypeError):
        scoring.SCORERS["new"] = scoring.SCORERS["ssim"]  # read-only


def test_score_dispatches_to_the_functions():
    image, reference = _pair((24, 24, 8))
    anomalous, samples = _samples_around(image, 3)
    mask = np.zeros(image.shape, bool)
    mask[4:20, 4:20] = True
    np.testing.assert_array_equal(scoring.score("residual", image, reference), scoring.residual(image, reference))
    np.testing.assert_array_equal(
        scoring.score("ssim", image, reference, mask=mask, sigma=1.5),
        1 - scoring.ssim_map(image, reference, sigma=1.5, mask=mask),
    )
    np.testing.assert_array_equal(scoring.score("ssim-ens", image, reference), scoring.ssim_ens(image, reference))
    np.testing.assert_array_equal(
        scoring.score("mhd-full", anomalous, samples, mask=mask, reg=1e-3),
        scoring.mahalanobis(anomalous, samples, mask=mask, covariance="full", reg=1e-3),
    )
    np.testing.assert_array_equal(
        scoring.score("mhd-diag", anomalous, samples, smooth_sigma=0),
        scoring.mahalanobis(anomalous, samples, covariance="diag", smooth_sigma=0),
    )
    np.testing.assert_array_equal(scoring.score("s-mean", anomalous, samples), scoring.s_mean(anomalous, samples))
    with pytest.raises(ValueError, match="unknown scorer"):
        scoring.score("mse", image, reference)
    with pytest.raises(ValueError, match="does not take"):
        scoring.score("residual", image, reference, sigma=1.0)
    with pytest.raises(ValueError, match="shape"):
        scoring.score("ssim", anomalous, samples)  # samples given where one reconstruction is needed


def _inputs_of(name, dtype):
    """What scorer ``name`` takes, in ``dtype``: an image and its reconstruction, or an image and
    3 samples around it; and a constant 0.25 for each model map it needs."""
    image, reference = _pair((20, 20, 6))
    anomalous, samples = _samples_around(image, 3)
    first, second = (image, reference) if scoring.SCORERS[name].needs == "reconstruction" else (anomalous, samples)
    maps = {map_name: np.full(first.shape, 0.25, dtype) for map_name in scoring.SCORERS[name].needs_maps}
    return first.astype(dtype), second.astype(dtype), maps


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_numpy_in_numpy_out_and_torch_in_torch_out(name):
    first, second, maps = _inputs_of(name, np.float32)
    as_numpy = scoring.score(name, first, second, maps=maps)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32 and as_numpy.shape == first.shape
    as_torch = scoring.score(name, torch.from_numpy(first), torch.from_numpy(second),
                             maps={key: torch.from_numpy(value) for key, value in maps.items()})
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32 and as_torch.device.type == "cpu"
    np.testing.assert_allclose(as_torch.numpy(), as_numpy, atol=1e-6)
    as_float64 = scoring.score(name, first.astype(np.float64), second.astype(np.float64), maps=maps)
    assert as_float64.dtype == np.float64
    # A 2D slice works the same way.
    slice_score = scoring.score(name, first[:, :, 2], second[..., 2],
                                maps={key: value[:, :, 2] for key, value in maps.items()})
    assert slice_score.shape == first.shape[:2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", SCORER_NAMES)
def test_gpu_tensors_stay_on_the_gpu(name):
    first, second, maps = _inputs_of(name, np.float64)
    on_gpu = scoring.score(name, torch.from_numpy(first).cuda(), torch.from_numpy(second).cuda(),
                           maps={key: torch.from_numpy(value).cuda() for key, value in maps.items()})
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), scoring.score(name, first, second, maps=maps), atol=1e-9)


# --------------------------------------------------------------------------- bad inputs


def _bad_cases():
    image, reference = _pair((16, 16, 4))
    _, samples = _samples_around(image, 3)
    with_nan = image.copy()
    with_nan[3, 3, 1] = np.nan
    samples_nan = samples.copy()
    samples_nan[1, 2, 2, 2] = np.nan
    empty = np.zeros(image.shape, bool)
    return [
        ("ssim shape mismatch", lambda: scoring.ssim_map(image, reference[:-1]), "shape"),
        ("residual shape mismatch", lambda: scoring.residual(image, reference[..., :3]), "shape"),
        ("ssim-ens shape mismatch", lambda: scoring.ssim_ens(image, reference.T), "shape"),
        ("samples shape mismatch", lambda: scoring.mahalanobis(image, samples[:, :-1]), "shape"),
        ("samples without N axis", lambda: scoring.mahalanobis(image, reference), "shape"),
        ("one sample", lambda: scoring.mahalanobis(image, samples[:1]), "at least 2 samples"),
        ("one sample, s-mean", lambda: scoring.s_mean(image, samples[:1]), "at least 2 samples"),
        ("one sample, mhd-ssim", lambda: scoring.mhd_ssim(image, samples[:1]), "at least 2 samples"),
        ("empty mask ssim", lambda: scoring.ssim_map(image, reference, mask=empty), "empty"),
        ("empty mask mhd", lambda: scoring.mahalanobis(image, samples, mask=empty), "empty"),
        ("empty mask residual", lambda: scoring.residual(image, reference, mask=empty), "empty"),
        ("mask shape", lambda: scoring.ssim_ens(image, reference, mask=empty[:, :, 0]), "mask has shape"),
        ("NaN image ssim", lambda: scoring.ssim_map(with_nan, reference), "NaN"),
        ("NaN reference", lambda: scoring.ssim_ens(image, with_nan), "NaN"),
        ("NaN image mhd", lambda: scoring.mahalanobis(with_nan, samples), "NaN"),
        ("NaN samples", lambda: scoring.mahalanobis(image, samples_nan), "NaN"),
        ("NaN reconstruction", lambda: scoring.residual(image, with_nan), "NaN"),
        ("NaN torch", lambda: scoring.ssim_map(torch.from_numpy(with_nan), torch.from_numpy(reference)), "NaN"),
        ("1D image", lambda: scoring.ssim_map(image[:, 0, 0], reference[:, 0, 0]), "2D slice"),
        ("4D image", lambda: scoring.residual(image[None], reference[None]), "2D slice"),
        ("4D image mhd", lambda: scoring.mahalanobis(samples, samples[None].repeat(2, 0)), "2D slice"),
        ("bad covariance", lambda: scoring.mahalanobis(image, samples, covariance="dense"), "covariance"),
        ("bad reg", lambda: scoring.mahalanobis(image, samples, reg=0), "reg"),
        ("bad sigma", lambda: scoring.ssim_map(image, reference, sigma=0), "sigma"),
        ("bad data_range", lambda: scoring.ssim_map(image, reference, data_range=-1), "data_range"),
        ("no sigmas", lambda: scoring.ssim_ens(image, reference, sigmas=()), "sigma"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(case):
    _, call, message = _bad_cases()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_directed_residuals_count_one_way_each_and_add_up_to_the_residual():
    from napari_brain_uad.scoring import SCORERS, residual, score

    rng = np.random.default_rng(4)
    image, reconstruction = rng.random((8, 8, 4)), rng.random((8, 8, 4))
    mask = rng.random((8, 8, 4)) > 0.3
    darker = score("residual-dark", image, reconstruction, mask)
    brighter = score("residual-bright", image, reconstruction, mask)
    np.testing.assert_allclose(darker, np.where(mask & (image < reconstruction), reconstruction - image, 0.0))
    np.testing.assert_allclose(darker + brighter, residual(image, reconstruction, mask))
    assert SCORERS["residual-dark"].needs == "reconstruction" and SCORERS["residual-dark"].default_samples == 1
    with pytest.raises(ValueError, match="direction"):
        residual(image, reconstruction, direction="sideways")


def test_lesion_direction_follows_the_contrast():
    from napari_brain_uad.scoring import lesion_direction_scorer

    assert lesion_direction_scorer("T1") == "residual-dark"  # most MS lesions are dark on T1
    assert lesion_direction_scorer("flair") == lesion_direction_scorer("T2") == "residual-bright"
    assert lesion_direction_scorer("T1c") is None and lesion_direction_scorer(None) is None


def test_sadm_score_adds_the_segmentation_to_the_ssim_dissimilarity():
    image, reconstruction = _pair((20, 20, 6))
    segmentation = np.random.default_rng(4).random(image.shape)
    mask = np.zeros(image.shape, bool)
    mask[3:17, 3:17] = True
    dissimilarity = 1 - scoring.ssim_map(image, reconstruction, sigma=1.0, mask=mask)
    maps = {"segmentation": segmentation}
    summed = scoring.score("ssim+segmentation", image, reconstruction, mask=mask, maps=maps)
    np.testing.assert_allclose(summed, np.where(mask, dissimilarity + segmentation, 0), atol=1e-12)
    # The thesis's weighted form: beta * (1 - SSIM) + (1 - beta) * segmentation.
    weighted = scoring.score("ssim+segmentation", image, reconstruction, mask=mask, maps=maps, weight=0.3)
    np.testing.assert_allclose(weighted, np.where(mask, 0.3 * dissimilarity + 0.7 * segmentation, 0), atol=1e-12)
    with pytest.raises(ValueError, match="segmentation map"):
        scoring.score("ssim+segmentation", image, reconstruction)
    with pytest.raises(ValueError, match="weight"):
        scoring.score("ssim+segmentation", image, reconstruction, maps=maps, weight=1.5)
    # With the residual in place of 1 - SSIM (for a base whose residual works better).
    error = np.abs(image - reconstruction)
    np.testing.assert_allclose(scoring.score("residual+segmentation", image, reconstruction, mask=mask, maps=maps),
                               np.where(mask, error + segmentation, 0), atol=1e-12)
    np.testing.assert_allclose(
        scoring.score("residual+segmentation", image, reconstruction, mask=mask, maps=maps, weight=0.8),
        np.where(mask, 0.8 * error + 0.2 * segmentation, 0), atol=1e-12)


def test_every_kinds_default_scorer_is_a_scorer_its_maps_can_feed():
    """A kind declares its paper's scorer (``default_scorer``); the card falls back otherwise."""
    from napari_brain_uad.model_card import FALLBACK_SCORER, default_scorer
    from napari_brain_uad.models import MODEL_KINDS

    for kind, model_class in MODEL_KINDS.items():
        name = default_scorer({"kind": kind})
        assert name == (model_class.default_scorer or FALLBACK_SCORER)
        assert scoring.SCORERS[name].usable_with(model_class.extra_maps), kind
    assert default_scorer({"kind": "unknown"}) == default_scorer({}) == FALLBACK_SCORER


def test_importing_scoring_alone_lists_the_kinds_own_scorers():
    """SADM's and PHANES's scorers are defined with their kinds, which import scoring; scoring
    imports the kinds only when its registry is first read, so a fresh process that imports
    scoring alone still lists them, in the fixed order."""
    code = ("import sys\n"
            "from napari_brain_uad import scoring\n"
            "print('napari_brain_uad.models' in sys.modules)\n"
            "print(','.join(scoring.SCORERS))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported_before_reading, names = result.stdout.strip().splitlines()[-2:]
    assert imported_before_reading == "False"
    assert tuple(names.split(",")) == SCORER_NAMES


def test_a_scorer_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        scoring.register_scorer(scoring.Scorer("ssim", scoring.ssim_ens, "reconstruction", "another ssim"))
    assert scoring.SCORERS["ssim"].description.startswith("1 − SSIM")
