"""Noise fields for diffusion models: batched 2D simplex noise and Gaussian noise.

Simplex noise (as used by AnoDDPM in place of Gaussian noise) is evaluated here for every
pixel of every slice and every octave at once with tensor operations, on CPU or GPU.

Frequency convention
--------------------
``frequency`` follows AnoDDPM's use of the word: it is the *length scale in pixels* of the
first (coarsest) octave, not a count of cycles. Octave ``i`` (``i = 0 .. octaves - 1``) samples
the simplex lattice at

    (x, y) = (column, row) * 2**i / frequency + random offset,

so one lattice cell spans ``frequency / 2**i`` pixels. With the defaults (frequency 64,
6 octaves) on a 96-pixel slice the coarsest octave has about 1.5 lattice cells across the
slice and the finest has cells of 2 pixels: fine-grained but spatially correlated noise.
Octave ``i`` is weighted by ``persistence**i``; the sum is not normalised (its standard
deviation is about 0.5, see the tests), unless ``normalise=True``.

Random tables
-------------
Each field and each octave has its own random tables (see :class:`SimplexTables`): a
permutation of 0..255 used to hash lattice points, 256 random unit gradients, an integer
lattice offset and a fractional coordinate offset. The vectorised evaluation and the
per-pixel reference both read the same tables, so they can be compared exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SimplexTables",
    "draw_simplex_tables",
    "gaussian_noise",
    "per_pixel_reference_simplex",
    "simplex_noise_2d",
    "simplex_noise_from_tables",
]

TABLE_SIZE = 256
# Skew (F2) and unskew (G2) factors mapping the square grid onto the triangular simplex grid.
SKEW = 0.5 * (math.sqrt(3.0) - 1.0)
UNSKEW = (3.0 - math.sqrt(3.0)) / 6.0
# Squared radius of each corner's kernel (0.5 - r²)^4: zero beyond, so contributions are local.
KERNEL_RADIUS_SQUARED = 0.5
# Conventional 2D simplex output scale: brings a single octave to roughly [-1, 1].
OUTPUT_SCALE = 70.0


@dataclass(frozen=True)
class SimplexTables:
    """Random tables of ``fields`` noise fields with ``octaves`` octaves each.

    permutation: (fields, octaves, 256) int64, a permutation of 0..255 per field and octave.
    gradients: (fields, octaves, 256, 2) float64, random unit vectors.
    lattice_offset: (fields, octaves, 2) int64 in [0, 256): added to lattice indices before
        hashing. Shifting by whole lattice vectors is what makes fields start at different
        places of the (256-periodic) lattice while the coordinates themselves stay small,
        which keeps float32 evaluation accurate.
    fractional_offset: (fields, octaves, 2) float64 in [0, 1): added to the coordinates, so
        that pixel centres do not sit at the same place in every lattice cell.
    """

    permutation: torch.Tensor
    gradients: torch.Tensor
    lattice_offset: torch.Tensor
    fractional_offset: torch.Tensor

    @property
    def fields(self) -> int:
        return int(self.permutation.shape[0])

    @property
    def octaves(self) -> int:
        return int(self.permutation.shape[1])


def _resolve_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """An int is a seed for a fresh CPU generator; None means torch's global generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(f"generator must be None, an int seed or a torch.Generator, got {generator!r}")
    seeded = torch.Generator(device="cpu")
    seeded.manual_seed(generator)
    return seeded


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(int(size) for size in shape)
    except TypeError as error:
        raise ValueError(f"shape must be (B, H, W) or (B, C, H, W), got {shape!r}") from error
    if len(dims) not in (3, 4) or any(size < 1 for size in dims) or dims != tuple(shape):
        raise ValueError(f"shape must be (B, H, W) or (B, C, H, W) of positive ints, got {shape!r}")
    return dims


def draw_simplex_tables(
    fields: int, octaves: int, generator: torch.Generator | int | None = None
) -> SimplexTables:
    """Draw independent random tables for ``fields`` fields of ``octaves`` octaves.

    Drawn on the generator's device (CPU for a seed or None) and kept in float64/int64, so a
    seed gives the same tables whichever device the noise is then evaluated on.
    """
    if fields < 1 or octaves < 1:
        raise ValueError(f"fields and octaves must be >= 1, got {fields} and {octaves}")
    generator = _resolve_generator(generator)
    device = _generator_device(generator)
    # argsort of uniform draws gives one uniformly random permutation per row in one call.
    permutation = torch.argsort(
        torch.rand(fields, octaves, TABLE_SIZE, generator=generator, device=device), dim=-1
    )
    angle = torch.rand(fields, octaves, TABLE_SIZE, generator=generator, device=device, dtype=torch.float64)
    angle = angle * (2.0 * math.pi)
    gradients = torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    lattice_offset = torch.randint(
        0, TABLE_SIZE, (fields, octaves, 2), generator=generator, device=device, dtype=torch.int64
    )
    fractional_offset = torch.rand(fields, octaves, 2, generator=generator, device=device, dtype=torch.float64)
    return SimplexTables(permutation, gradients, lattice_offset, fractional_offset)


def _check_octave_parameters(frequency: float, persistence: float) -> None:
    if not (isinstance(frequency, (int, float)) and math.isfinite(frequency) and frequency > 0):
        raise ValueError(f"frequency must be a positive finite number, got {frequency!r}")
    if not (isinstance(persistence, (int, float)) and math.isfinite(persistence) and persistence > 0):
        raise ValueError(f"persistence must be a positive finite number, got {persistence!r}")


def simplex_noise_from_tables(
    tables: SimplexTables,
    height: int,
    width: int,
    frequency: float = 64.0,
    persistence: float = 0.8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate the fields described by ``tables`` on a ``height × width`` pixel grid.

    Returns a (fields, height, width) tensor. All fields, octaves and pixels are computed
    together: the (field, octave) pairs are flattened into one "layer" axis of length L.
    Arithmetic is in float64 when ``dtype`` is float64, otherwise in float32.
    """
    _check_octave_parameters(frequency, persistence)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} and {width}")
    device = torch.device(device) if device is not None else tables.permutation.device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    fields, octaves = tables.fields, tables.octaves
    layers = fields * octaves

    permutation = tables.permutation.to(device).reshape(layers, TABLE_SIZE)
    gradients = tables.gradients.to(device=device, dtype=work).reshape(layers, TABLE_SIZE, 2)
    lattice_offset = tables.lattice_offset.to(device).reshape(layers, 2, 1)
    fractional_offset = tables.fractional_offset.to(device=device, dtype=work).reshape(layers, 2, 1)

    # Pixel coordinates scaled per octave: octave i has lattice cells of frequency / 2**i pixels.
    octave_scale = torch.tensor([2.0**i / frequency for i in range(octaves)], device=device, dtype=work)
    layer_scale = octave_scale.repeat(fields).reshape(layers, 1)
    rows = torch.arange(height, device=device, dtype=work)
    columns = torch.arange(width, device=device, dtype=work)
    pixel_y = rows.reshape(height, 1).expand(height, width).reshape(1, -1)
    pixel_x = columns.reshape(1, width).expand(height, width).reshape(1, -1)
    x = pixel_x * layer_scale + fractional_offset[:, 0]  # (L, P)
    y = pixel_y * layer_scale + fractional_offset[:, 1]

    # Find the simplex (triangle) containing each point via the skewed square grid.
    skew = (x + y) * SKEW
    cell_i = torch.floor(x + skew)
    cell_j = torch.floor(y + skew)
    unskew = (cell_i + cell_j) * UNSKEW
    x0 = x - (cell_i - unskew)
    y0 = y - (cell_j - unskew)
    # Lower triangle (x0 > y0) steps along x first, upper triangle along y.
    lower = x0 > y0
    step_i = lower.to(torch.int64)
    step_j = 1 - step_i
    step_x = lower.to(work)
    step_y = 1.0 - step_x

    corner_dx = (x0, x0 - step_x + UNSKEW, x0 - 1.0 + 2.0 * UNSKEW)
    corner_dy = (y0, y0 - step_y + UNSKEW, y0 - 1.0 + 2.0 * UNSKEW)
    base_i = cell_i.to(torch.int64) + lattice_offset[:, 0]
    base_j = cell_j.to(torch.int64) + lattice_offset[:, 1]
    corner_i = (base_i, base_i + step_i, base_i + 1)
    corner_j = (base_j, base_j + step_j, base_j + 1)

    gradient_x = gradients[..., 0]
    gradient_y = gradients[..., 1]
    total = torch.zeros_like(x)
    for dx, dy, ci, cj in zip(corner_dx, corner_dy, corner_i, corner_j):
        # Hash the lattice point through the permutation twice (standard Perlin/simplex hash);
        # masking with 255 makes the lattice 256-periodic and handles negative indices.
        inner = torch.gather(permutation, 1, cj & (TABLE_SIZE - 1))
        index = torch.gather(permutation, 1, (ci + inner) & (TABLE_SIZE - 1))
        dot = torch.gather(gradient_x, 1, index) * dx + torch.gather(gradient_y, 1, index) * dy
        falloff = torch.clamp(KERNEL_RADIUS_SQUARED - dx * dx - dy * dy, min=0.0)
        total = total + falloff.pow(4) * dot

    amplitude = torch.tensor([persistence**i for i in range(octaves)], device=device, dtype=work)
    layered = (OUTPUT_SCALE * total).reshape(fields, octaves, height * width)
    summed = (layered * amplitude.reshape(1, octaves, 1)).sum(dim=1)
    return summed.reshape(fields, height, width).to(dtype)


def simplex_noise_2d(
    shape,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    shared: bool = False,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = False,
) -> torch.Tensor:
    """Fractal 2D simplex noise, one field per H×W slice of ``shape``.

    Args:
        shape: (B, H, W) or (B, C, H, W).
        octaves: number of octaves (>= 1); octave i has lattice cells of frequency / 2**i
            pixels and weight persistence**i.
        persistence: amplitude factor between successive octaves (> 0).
        frequency: length scale in pixels of the coarsest octave (> 0); see the module doc.
        shared: False gives an independent field for every slice. True draws one field per
            channel and repeats it across the batch dimension B, as AnoDDPM's reference code
            did (for (B, H, W) that is one field for the whole batch).
        generator: None (torch's global RNG), an int seed, or a torch.Generator. The random
            tables are drawn on the generator's device (CPU for a seed), so a seed gives the
            same noise on CPU and GPU up to floating-point rounding.
        device, dtype: of the result (device defaults to CPU).
        normalise: if True, rescale every field to zero mean and unit standard deviation
            (population std). Off by default: the raw sum has std of about 0.5.

    Returns:
        Tensor of ``shape`` on ``device`` with ``dtype``.
    """
    dims = _check_shape(shape)
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ValueError(f"octaves must be an int >= 1, got {octaves!r}")
    _check_octave_parameters(frequency, persistence)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    batch, height, width = dims[0], dims[-2], dims[-1]
    channels = dims[1] if len(dims) == 4 else 1

    fields = channels if shared else batch * channels
    tables = draw_simplex_tables(fields, octaves, generator)
    noise = simplex_noise_from_tables(tables, height, width, frequency, persistence, device, dtype)
    if normalise:
        # Statistics in float64 at least, so that std is 1 to rounding in low precision too.
        stats = noise.to(torch.float64) if dtype != torch.float64 else noise
        mean = stats.mean(dim=(-2, -1), keepdim=True)
        std = stats.std(dim=(-2, -1), keepdim=True, correction=0).clamp_min(torch.finfo(torch.float64).tiny)
        noise = ((stats - mean) / std).to(dtype)
    noise = noise.reshape(1 if shared else batch, channels, height, width)
    if shared:
        noise = noise.expand(batch, channels, height, width).contiguous()
    return noise.reshape(dims)


def gaussian_noise(
    shape,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (any shape), the usual diffusion-model noise.

    Drawn on the generator's device (CPU for a seed or None) and moved to ``device``, so a seed
    gives the same values on any device.
    """
    try:
        dims = tuple(int(size) for size in shape)
    except TypeError as error:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from error
    if any(size < 0 for size in dims):
        raise ValueError(f"shape sizes must be non-negative, got {shape!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    generator = _resolve_generator(generator)
    drawn = torch.randn(dims, generator=generator, device=_generator_device(generator), dtype=dtype)
    return drawn.to(torch.device(device) if device is not None else torch.device("cpu"))


def per_pixel_reference_simplex(
    tables: SimplexTables,
    height: int,
    width: int,
    field: int = 0,
    frequency: float = 64.0,
    persistence: float = 0.8,
) -> list[list[float]]:
    """Straightforward per-pixel evaluation of one field, in plain Python floats (float64).

    Same algorithm and tables as :func:`simplex_noise_from_tables`, one pixel and one octave
    at a time; for tests and benchmarks only. Returns ``height`` rows of ``width`` values.
    """
    _check_octave_parameters(frequency, persistence)
    permutation = tables.permutation[field].tolist()
    gradients = tables.gradients[field].tolist()
    lattice_offset = tables.lattice_offset[field].tolist()
    fractional_offset = tables.fractional_offset[field].tolist()
    mask = TABLE_SIZE - 1

    def octave_value(octave: int, x: float, y: float) -> float:
        perm = permutation[octave]
        grads = gradients[octave]
        offset_i, offset_j = lattice_offset[octave]
        skew = (x + y) * SKEW
        i = math.floor(x + skew)
        j = math.floor(y + skew)
        unskew = (i + j) * UNSKEW
        x0 = x - (i - unskew)
        y0 = y - (j - unskew)
        step_i, step_j = (1, 0) if x0 > y0 else (0, 1)
        corners = (
            (x0, y0, i, j),
            (x0 - step_i + UNSKEW, y0 - step_j + UNSKEW, i + step_i, j + step_j),
            (x0 - 1.0 + 2.0 * UNSKEW, y0 - 1.0 + 2.0 * UNSKEW, i + 1, j + 1),
        )
        total = 0.0
        for dx, dy, ci, cj in corners:
            falloff = KERNEL_RADIUS_SQUARED - dx * dx - dy * dy
            if falloff <= 0.0:
                continue
            index = perm[(ci + offset_i + perm[(cj + offset_j) & mask]) & mask]
            gx, gy = grads[index]
            total += falloff**4 * (gx * dx + gy * dy)
        return OUTPUT_SCALE * total

    rows = []
    for row in range(height):
        values = []
        for column in range(width):
            value = 0.0
            for octave in range(tables.octaves):
                scale = 2.0**octave / frequency
                x = column * scale + fractional_offset[octave][0]
                y = row * scale + fractional_offset[octave][1]
                value += persistence**octave * octave_value(octave, x, y)
            values.append(value)
        rows.append(values)
    return rows
