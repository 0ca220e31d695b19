"""Batched simplex noise: equality with the per-pixel reference, statistics, seeding, errors."""

from __future__ import annotations

import pytest
import torch

from napari_brain_uad.noise import (
    OUTPUT_SCALE,
    draw_simplex_tables,
    gaussian_noise,
    per_pixel_reference_simplex,
    simplex_noise_2d,
    simplex_noise_from_tables,
)


def neighbour_correlation(fields: torch.Tensor) -> float:
    """Pearson correlation of horizontally adjacent pixels, pooled over all fields."""
    left = fields[..., :-1].reshape(-1).double()
    right = fields[..., 1:].reshape(-1).double()
    return float(torch.corrcoef(torch.stack((left, right)))[0, 1])


@pytest.fixture(scope="module")
def default_noise() -> torch.Tensor:
    return simplex_noise_2d((8, 96, 96), generator=1234)


@pytest.mark.parametrize("frequency", [8.0, 5.5])
def test_vectorised_equals_per_pixel_reference(frequency):
    tables = draw_simplex_tables(fields=3, octaves=2, generator=7)
    vectorised = simplex_noise_from_tables(tables, 16, 16, frequency, 0.8, dtype=torch.float64)
    for field in range(3):
        reference = torch.tensor(
            per_pixel_reference_simplex(tables, 16, 16, field, frequency, 0.8), dtype=torch.float64
        )
        assert reference.abs().max() > 0.05  # not trivially zero
        torch.testing.assert_close(vectorised[field], reference, atol=1e-5, rtol=0)
    # float32 evaluation stays close too: coordinates are kept small by the integer lattice offset.
    single = simplex_noise_from_tables(tables, 16, 16, frequency, 0.8)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), vectorised, atol=1e-4, rtol=0)


def test_default_statistics(default_noise):
    # Measured with seed 1234: mean ≈ -0.02, std ≈ 0.6 (per-field std 0.55–0.68), max |value| ≈ 2.
    assert default_noise.shape == (8, 96, 96)
    assert default_noise.dtype == torch.float32
    assert torch.isfinite(default_noise).all()
    assert abs(float(default_noise.mean())) < 0.1
    assert 0.4 < float(default_noise.std()) < 0.8
    per_field_std = default_noise.std(dim=(1, 2))
    assert (per_field_std > 0.3).all() and (per_field_std < 0.9).all()
    # Loose analytic bound: each corner kernel contributes at most max_r (0.5 - r²)^4 r.
    corner_max = max(((0.5 - r * r) ** 4) * r for r in [k / 10000 for k in range(7072)])
    bound = OUTPUT_SCALE * 3 * corner_max * sum(0.8**i for i in range(6))
    assert float(default_noise.abs().max()) < bound
    assert float(default_noise.abs().max()) < 4.0


def test_noise_is_spatially_smooth_unlike_gaussian(default_noise):
    # Measured ≈ 0.89 for simplex, ≈ 0 for Gaussian.
    assert neighbour_correlation(default_noise) > 0.6
    assert abs(neighbour_correlation(gaussian_noise((8, 96, 96), generator=0))) < 0.05


def test_independent_fields_differ_and_are_weakly_correlated():
    noise = simplex_noise_2d((32, 96, 96), generator=5)
    flat = noise.reshape(32, -1).double()
    for first in range(31):
        assert not torch.equal(noise[first], noise[first + 1])
    correlation = torch.corrcoef(flat)
    off_diagonal = correlation[~torch.eye(32, dtype=torch.bool)]
    # The coarsest octave has only ~1.5 lattice cells per slice, so single pairs of
    # independent fields can correlate by chance (max measured ≈ 0.3); on average they do not.
    assert float(off_diagonal.abs().mean()) < 0.12
    assert float(off_diagonal.mean().abs()) < 0.05
    assert float(off_diagonal.abs().max()) < 0.6


def test_shared_gives_identical_slices():
    noise = simplex_noise_2d((4, 32, 40), shared=True, generator=3)
    for index in range(1, 4):
        assert torch.equal(noise[0], noise[index])
    # With channels, one field per channel is shared across the batch.
    noise4 = simplex_noise_2d((3, 2, 24, 24), shared=True, generator=3)
    assert torch.equal(noise4[0], noise4[2])
    assert not torch.equal(noise4[0, 0], noise4[0, 1])


def test_seeding():
    first = simplex_noise_2d((2, 32, 32), generator=42)
    assert torch.equal(first, simplex_noise_2d((2, 32, 32), generator=42))
    assert not torch.equal(first, simplex_noise_2d((2, 32, 32), generator=43))
    generator = torch.Generator().manual_seed(42)
    assert torch.equal(first, simplex_noise_2d((2, 32, 32), generator=generator))
    torch.manual_seed(0)
    global_first = simplex_noise_2d((2, 32, 32))
    torch.manual_seed(0)
    assert torch.equal(global_first, simplex_noise_2d((2, 32, 32)))
    assert torch.equal(gaussian_noise((3, 4), generator=1), gaussian_noise((3, 4), generator=1))


def test_normalise_gives_unit_fields():
    noise = simplex_noise_2d((5, 48, 64), generator=9, normalise=True)
    torch.testing.assert_close(noise.mean(dim=(1, 2)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(noise.std(dim=(1, 2), correction=0), torch.ones(5), atol=1e-5, rtol=0)


def test_four_dimensional_shape_and_dtype():
    noise = simplex_noise_2d((2, 3, 20, 30), generator=0, dtype=torch.float64)
    assert noise.shape == (2, 3, 20, 30)
    assert noise.dtype == torch.float64
    flat = noise.reshape(6, -1)
    assert len({tuple(row[:5].tolist()) for row in flat}) == 6  # all six fields distinct
    # Same seed and draw order: the (B, C) fields are the B*C fields of a flat batch.
    torch.testing.assert_close(noise.reshape(6, 20, 30), simplex_noise_2d((6, 20, 30), generator=0, dtype=torch.float64))


def test_octaves_and_persistence_change_the_field_as_expected():
    tables = draw_simplex_tables(fields=1, octaves=3, generator=2)
    one = draw_simplex_tables(fields=1, octaves=1, generator=2)
    # A single octave is smooth; more octaves add fine detail (lower neighbour correlation).
    coarse = simplex_noise_from_tables(one, 64, 64, frequency=16.0)
    detailed = simplex_noise_from_tables(tables, 64, 64, frequency=16.0)
    assert neighbour_correlation(coarse) > neighbour_correlation(detailed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    cpu = simplex_noise_2d((4, 96, 96), generator=11)
    gpu = simplex_noise_2d((4, 96, 96), generator=11, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"octaves": 0},
        {"octaves": -2},
        {"octaves": 2.5},
        {"frequency": 0.0},
        {"frequency": -64.0},
        {"frequency": float("nan")},
        {"persistence": 0.0},
        {"generator": "seed"},
        {"dtype": torch.int64},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        simplex_noise_2d((2, 16, 16), **kwargs)


@pytest.mark.parametrize("shape", [(16, 16), (1, 2, 3, 4, 5), (2, 0, 16), (2, 16.5, 16), 7, "abc"])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        simplex_noise_2d(shape)
