"""The 3D VAE with spatial erasing (thesis sec. 3.4.1 / 4.1 / ch. 8.1; Bengs et al.): whole
volumes in, whole volumes out.

What the paper fixes, and what it is here:

- **Volumes, not slices**: the paper crops a 1 mm brain to 191×158×163 and downsamples it to
  64×64×64 (≈ 3 mm) and takes the residual there. Here the network sees the model-space volume
  (2 mm, 96×96 in-plane, the brain's axial slices), padded or cropped along the axial axis to
  ``depth_slices`` (96: 192 mm, more than any brain spans) with the brain centred, and
  downsampled by ``downsample`` (1.5, area averaging) to **64×64×64 voxels of 3 mm**. What the
  network changes (its output minus its input) is upsampled (trilinear) back to the 96×96×96
  block, cut back to the scan's slices and added to the input: the reconstruction lies exactly
  on the model-space grid, its residual is the paper's 64³ residual brought to 2 mm, and every
  later step (scoring, post-processing, the native grid) is the one the 2D kinds use. (The
  network's output upsampled as it is would add the 3 mm grid's blur to every residual: a mean
  of 0.058 in the brain of a healthy IXI scan, with a perfect network.)
- **Network**: "the architecture details remain the same for 2D and 3D [...] only the dimension
  of the network's operation is changed", so this is the 2D VAE's network (MONAI's
  ``VarAutoEncoder``: strided convolutions down, transposed convolutions up, instance norm,
  PReLU, a dense Gaussian latent) in 3D, with the paper's 3D latent size 512. Four stride-2
  levels take 64³ to 4³, the first one halving the input as the paper's figure 2 does.
- **Loss**: l1 between the clean input and the reconstruction plus ``beta`` × KL, the same
  reduction as the 2D VAE (mean per voxel; KL summed over latent dimensions, mean over the batch).
  Neither β nor the reduction is in the paper; with this reduction the KL term outweighed the
  mean-voxel l1 at β = 1e-3 and blurred the reconstructions. β was chosen on the real-lesion
  benchmark (T1, 6 cases; ``bench_real_lesions.py``): β = 1e-3 / 1e-5 / 1e-7 gave [Dice]
  0.066 / 0.066 / 0.073 (residual-dark) and a healthy mean |x − x̂| of 0.129 / 0.108 / 0.095;
  the default is 1e-7, where the model is close to a plain autoencoder with erasing.
  Adam with learning rate 1e-3 (the paper) is set in the training config.
- **Spatial erasing** on the input only (the target stays clean), each volume with probability
  0.5: one cube of 1-25 % of the voxels (``"cube"``, the paper's best with noise fill, the
  default), up to ten cubes totalling 1-25 % (``"multi-cube"``), or the left or right half of
  the brain over 1-32 consecutive axial slices (``"half-volume"``); filled with zeros or with
  noise drawn from the volume's own brain intensities (``erasing_fill``). Fractions and slice
  counts refer to the 64³ network input, as in the paper.
- **Test time**: no erasing; the posterior mean is decoded, so a volume always gets the same
  reconstruction; the residual in the eroded brain is scored by the usual steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..nifti import ScanWarning
from ..preprocess import ModelSpaceSpec
from .autoencoders import (
    VariationalCoding,
    check_vae_settings,
    kl_divergence,
    reconstruction_error,
    variational_network,
)
from .base import ModelConfig, ReconstructionModel, random_integers, random_uniform

ERASING_MODES = ("cube", "multi-cube", "half-volume", "none")
ERASING_FILLS = ("noise", "zeros")
# Placements tried before multi-cube erasing falls back to one box: overlapping or rounded boxes
# can leave the union outside the asked share.
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class VAE3DConfig(ModelConfig):
    """Hyper-parameters of the 3D VAE; the network grid is (in-plane, ``depth_slices``) / ``downsample``.

    ``channels`` and ``strides`` are the 2D VAE's defaults (the paper keeps 2D and 3D alike);
    ``latent_size`` 512 is the paper's 3D choice. ``erasing_fraction`` bounds the erased share
    of the network input (single cube, or all cubes together); ``max_cubes`` is the paper's "up
    to ten"; ``half_volume_slices`` bounds the consecutive axial slices of half-volume erasing.
    ``keep_input_detail`` (see :meth:`VAE3D.forward`): the reconstruction is the 2 mm input plus
    the network's change, so the 3 mm grid's blur is not scored as anomaly; False gives the
    network's output upsampled as it is.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    latent_size: int = 512
    num_res_units: int = 0
    beta: float = 1e-7  # chosen on real lesions (see the module docstring)
    loss: str = "l1"
    depth_slices: int = 96
    downsample: float = 1.5
    erasing: str = "cube"
    erasing_fill: str = "noise"
    erasing_probability: float = 0.5
    erasing_fraction: tuple[float, float] = (0.01, 0.25)
    max_cubes: int = 10
    half_volume_slices: tuple[int, int] = (1, 32)
    keep_input_detail: bool = True

    def __post_init__(self):
        check_vae_settings(self)
        if self.depth_slices < 1:
            raise ValueError(f"depth_slices must be at least 1, not {self.depth_slices}")
        if not (isinstance(self.downsample, (int, float)) and self.downsample >= 1):
            raise ValueError(f"downsample must be a number >= 1, not {self.downsample!r}")
        if self.erasing not in ERASING_MODES:
            raise ValueError(f"erasing must be one of {', '.join(ERASING_MODES)}, not {self.erasing!r}")
        if self.erasing_fill not in ERASING_FILLS:
            raise ValueError(f"erasing_fill must be one of {', '.join(ERASING_FILLS)}, not {self.erasing_fill!r}")
        if not 0 <= self.erasing_probability <= 1:
            raise ValueError(f"erasing_probability must be in [0, 1], not {self.erasing_probability}")
        low, high = self.erasing_fraction
        if not 0 < low <= high < 1:
            raise ValueError(f"erasing_fraction must be (low, high) with 0 < low <= high < 1, not {self.erasing_fraction}")
        if self.max_cubes < 1:
            raise ValueError(f"max_cubes must be at least 1, not {self.max_cubes}")
        fewest, most = self.half_volume_slices
        if not 1 <= fewest <= most:
            raise ValueError(f"half_volume_slices must be (fewest, most) with 1 <= fewest <= most, not {self.half_volume_slices}")


def network_grid(spec: ModelSpaceSpec, config: VAE3DConfig) -> tuple[int, int, int]:
    """The network's input shape: the model-space block (in-plane × ``depth_slices``) downsampled.

    Refused when the downsampling or the strides do not divide it, since the volume would then
    not map back onto the model-space grid exactly.
    """
    block = (*spec.in_plane, config.depth_slices)
    grid = []
    for size in block:
        scaled = size / config.downsample
        if abs(scaled - round(scaled)) > 1e-6:
            raise ValueError(
                f"downsample {config.downsample:g} must divide the model-space block "
                f"{' × '.join(map(str, block))} into whole voxels"
            )
        grid.append(int(round(scaled)))
    factor = math.prod(config.strides)
    if any(size % factor for size in grid):
        raise ValueError(
            f"the VAE3D's strides downsample by {factor}, which must divide its network grid "
            f"{' × '.join(map(str, grid))}; change strides, depth_slices or downsample"
        )
    return tuple(grid)


def centre_along_depth(volumes: torch.Tensor, depth: int) -> tuple[torch.Tensor, int]:
    """Volumes (..., Z) padded with zeros or cropped to ``depth`` slices, centred.

    Returns the block and the block's index of the volume's first slice (negative when the
    volume was cropped), which :func:`uncentre_along_depth` needs to undo it.
    """
    slices = volumes.shape[-1]
    offset = (depth - slices) // 2
    if offset >= 0:
        return F.pad(volumes, (offset, depth - slices - offset)), offset
    return volumes[..., -offset : -offset + depth], offset


def uncentre_along_depth(block: torch.Tensor, offset: int, slices: int, fallback: torch.Tensor) -> torch.Tensor:
    """The volume's own ``slices`` back from a centred block; slices that were cropped away
    (a volume deeper than the block) come from ``fallback``."""
    if offset >= 0:
        return block[..., offset : offset + slices]
    out = fallback.clone()
    out[..., -offset : -offset + block.shape[-1]] = block
    return out


# ---------------------------------------------------------------- spatial erasing


def box_sides(shape: Sequence[int], fraction: float, bounds: tuple[float, float] | None = None) -> list[int]:
    """Sides of a box shaped like ``shape`` holding ``fraction`` of its voxels (a cube on a cubic grid).

    Whole voxels cannot hit every fraction; with ``bounds`` the sides are nudged one voxel at a
    time until the share lies within them, so a single erased cube is always 1-25 % as asked.
    """
    total = math.prod(shape)
    sides = [min(size, max(1, round(size * fraction ** (1 / 3)))) for size in shape]
    if bounds is None:
        return sides
    low, high = bounds
    for _ in range(sum(shape)):
        share = math.prod(sides) / total
        if share < low:
            axis = min((a for a in range(len(shape)) if sides[a] < shape[a]), key=lambda a: sides[a])
            sides[axis] += 1
        elif share > high:
            axis = max((a for a in range(len(shape)) if sides[a] > 1), key=lambda a: sides[a])
            sides[axis] -= 1
        else:
            break
    return sides


def _place_box(region: torch.Tensor, sides: Sequence[int], generator, device) -> None:
    """Mark a box of ``sides`` at a random position that keeps it whole inside ``region``."""
    starts = [int(random_integers(0, size - side + 1, (1,), generator, device)) for size, side in zip(region.shape, sides)]
    region[tuple(slice(start, start + side) for start, side in zip(starts, sides))] = True


def cube_region(shape, fraction_bounds, generator=None, device="cpu") -> torch.Tensor:
    """One box of a random share in ``fraction_bounds`` at a random place (bool, ``shape``).

    The paper draws the centre anywhere in the image; the box is kept whole inside the volume
    here instead, so that its share is the one drawn and not cut at the border.
    """
    low, high = fraction_bounds
    fraction = float(random_uniform((1,), generator, device, low, high))
    region = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    _place_box(region, box_sides(shape, fraction, (low, high)), generator, device)
    return region


def multi_cube_region(shape, fraction_bounds, max_cubes: int, generator=None, device="cpu") -> torch.Tensor:
    """Up to ``max_cubes`` boxes whose union is a random share in ``fraction_bounds`` (bool, ``shape``).

    The drawn total is split among the boxes in random proportions; when overlaps or whole-voxel
    rounding leave the union outside the bounds, the boxes are placed again.
    """
    low, high = fraction_bounds
    total = math.prod(shape)
    count = int(random_integers(1, max_cubes + 1, (1,), generator, device))
    share = float(random_uniform((1,), generator, device, low, high))
    weights = random_uniform((count,), generator, device, 0.05, 1.0)
    parts = (weights / weights.sum() * share).tolist()
    for _ in range(_PLACEMENT_TRIES):
        region = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
        for part in parts:
            _place_box(region, box_sides(shape, part), generator, device)
        if low <= int(region.sum()) / total <= high:
            return region
    return cube_region(shape, (share, share) if low <= share <= high else fraction_bounds, generator, device)


def half_volume_region(brain_mask: torch.Tensor, side: str, start: int, count: int) -> torch.Tensor:
    """The ``side`` ("left" or "right") half of the brain over axial slices start..start+count-1.

    ``brain_mask`` (X, Y, Z) is in RAS order, so the patient's right is at high X; the halves
    meet at the middle of the brain's left-right extent (model space centres the brain, but a
    cropped or asymmetric mask need not be centred on the grid).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    region = torch.zeros_like(brain_mask, dtype=torch.bool)
    occupied = torch.nonzero(brain_mask.any(dim=2).any(dim=1)).flatten()
    middle = (int(occupied.min()) + int(occupied.max()) + 1) // 2 if len(occupied) else brain_mask.shape[0] // 2
    columns = slice(middle, None) if side == "right" else slice(0, middle)
    region[columns, :, start : start + count] = True
    return region


def random_half_volume_region(brain_mask: torch.Tensor, slice_bounds: tuple[int, int], generator=None) -> torch.Tensor:
    """A random side of the brain over a random run of consecutive axial slices within the brain."""
    device = brain_mask.device
    depth = brain_mask.shape[2]
    fewest, most = min(slice_bounds[0], depth), min(slice_bounds[1], depth)
    count = int(random_integers(fewest, most + 1, (1,), generator, device))
    occupied = torch.nonzero(brain_mask.any(dim=0).any(dim=0)).flatten()
    first, last = (int(occupied.min()), int(occupied.max())) if len(occupied) else (0, depth - 1)
    start = int(random_integers(first, max(first, last - count + 1) + 1, (1,), generator, device))
    start = min(start, depth - count)
    side = ("left", "right")[int(random_integers(0, 2, (1,), generator, device))]
    return half_volume_region(brain_mask, side, start, count)


def fill_region(volume: torch.Tensor, region: torch.Tensor, brain_mask: torch.Tensor, fill: str,
                generator=None) -> torch.Tensor:
    """``volume`` with ``region`` set to zeros or to values drawn (with replacement) from the
    volume's own brain voxels: "noise sampled from the image pixel distribution"."""
    erased = volume.clone()
    if fill == "zeros":
        erased[region] = 0.0
        return erased
    brain_values = volume[brain_mask]
    if brain_values.numel() == 0:  # no brain to draw from: nothing better than zeros
        erased[region] = 0.0
        return erased
    picks = random_integers(0, brain_values.numel(), (int(region.sum()),), generator, volume.device)
    erased[region] = brain_values[picks]
    return erased


def erase_inputs(volumes: torch.Tensor, brain_mask: torch.Tensor, config: VAE3DConfig,
                 generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Erased copies of ``volumes`` (B, 1, X, Y, Z) and the erased regions (B, 1, X, Y, Z, bool).

    Each volume is erased with probability ``config.erasing_probability`` by ``config.erasing``;
    the others pass unchanged (the paper's p = 0.5, "such that the network still receives
    unmodified images").
    """
    erased, regions = volumes.clone(), torch.zeros_like(volumes, dtype=torch.bool)
    if config.erasing == "none":
        return erased, regions
    device = volumes.device
    chosen = random_uniform((len(volumes),), generator, device) < config.erasing_probability
    for index in torch.nonzero(chosen).flatten().tolist():
        volume, brain = volumes[index, 0], brain_mask[index, 0]
        if config.erasing == "cube":
            region = cube_region(volume.shape, config.erasing_fraction, generator, device)
        elif config.erasing == "multi-cube":
            region = multi_cube_region(volume.shape, config.erasing_fraction, config.max_cubes, generator, device)
        else:
            region = random_half_volume_region(brain, config.half_volume_slices, generator)
        erased[index, 0] = fill_region(volume, region, brain, config.erasing_fill, generator)
        regions[index, 0] = region
    return erased, regions


# ---------------------------------------------------------------- the model


class VAE3D(VariationalCoding, ReconstructionModel):
    """3D VAE on whole model-space volumes (B, 1, X, Y, Z); see the module text for the grid."""

    kind = "vae3d"
    config_class = VAE3DConfig
    uses_noise_level = False
    volumetric = True
    # The thesis (ch. 8) scores the 3D VAE with the l1 residual |x − x̂|.
    default_scorer = "residual"

    def __init__(self, config: VAE3DConfig = VAE3DConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        self.grid = network_grid(spec, config)
        self.network = variational_network(3, self.grid, config)

    @property
    def depth_slices(self) -> int:
        """Model-space axial slices in the block the network sees (data are centred in it)."""
        return self.config.depth_slices

    # -- model space <-> network grid

    def to_network(self, volumes: torch.Tensor, brain_mask: torch.Tensor | None = None):
        """Model-space volumes (B, 1, X, Y, Z), any Z, on the network grid (area averaging, which
        also keeps the 1.5× downsampling from aliasing); the brain mask where half of a network
        voxel is brain. Returns (volumes, mask or None, depth offset)."""
        self._check_in_plane(volumes)
        block, offset = centre_along_depth(volumes, self.config.depth_slices)
        network_volumes = F.interpolate(block, size=self.grid, mode="area") if block.shape[2:] != self.grid else block
        network_mask = None
        if brain_mask is not None:
            mask_block, _ = centre_along_depth(brain_mask.to(volumes.dtype), self.config.depth_slices)
            network_mask = F.interpolate(mask_block, size=self.grid, mode="area") >= 0.5
        return network_volumes, network_mask, offset

    def from_network(self, outputs: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
        """Network outputs back on the model-space grid of ``like`` (B, 1, X, Y, Z): upsampled to
        the block, then cut to the volume's slices (slices outside the block keep ``like``)."""
        block_shape = (*like.shape[2:4], self.config.depth_slices)
        if outputs.shape[2:] != block_shape:
            outputs = F.interpolate(outputs, size=block_shape, mode="trilinear", align_corners=False)
        return uncentre_along_depth(outputs, offset, like.shape[-1], like)

    def _check_in_plane(self, volumes: torch.Tensor) -> None:
        if volumes.ndim != 5 or tuple(volumes.shape[2:4]) != tuple(self.spec.in_plane):
            raise ValueError(
                f"a VAE3D takes model-space volumes (B, 1, {self.spec.in_plane[0]}, {self.spec.in_plane[1]}, Z), "
                f"not {tuple(volumes.shape)}"
            )

    # -- the VAE

    def loss_terms(self, volumes, brain_mask=None, generator=None) -> dict[str, torch.Tensor]:
        """The objective's pieces on model-space volumes: the erased input, the reconstruction
        error against the clean input (network grid), KL, mu and logvar."""
        clean, network_mask, _ = self.to_network(volumes, brain_mask if brain_mask is not None else volumes > 0)
        erased, regions = erase_inputs(clean, network_mask, self.config, generator)
        mu, logvar = self.encode(erased)
        reconstruction = self.decode(self.sample_latent(mu, logvar, generator))
        return {
            "reconstruction": reconstruction_error(reconstruction, clean, self.config.loss),
            "kl": kl_divergence(mu, logvar),
            "mu": mu,
            "logvar": logvar,
            "erased": erased,
            "regions": regions,
            "clean": clean,
        }

    def training_loss(self, volumes, brain_mask=None, generator=None):
        """Reconstruction error of the clean volume from its erased copy + beta * KL.

        ``volumes`` (B, 1, X, Y, Z) in model space; ``brain_mask`` (same shape) is where noise
        fill draws its values and half-volume erasing finds the brain (default: voxels > 0).
        """
        terms = self.loss_terms(volumes, brain_mask, generator)
        return terms["reconstruction"] + self.config.beta * terms["kl"]

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction on the model-space grid from the posterior mean decoded.

        With ``keep_input_detail`` it is the input plus the network's change (output minus its
        own input on the network grid, upsampled), so that the residual is the paper's, taken on
        the network grid, rather than also holding the detail the coarser grid cannot carry.
        """
        network_volumes, _, offset = self.to_network(volumes)
        mu, _ = self.encode(network_volumes)
        output = self.decode(mu)
        if self.config.keep_input_detail:
            return volumes + self.from_network(output - network_volumes, offset, torch.zeros_like(volumes))
        return self.from_network(output, offset, volumes)

    @torch.no_grad()
    def reconstruct(self, volumes, t=None, generator=None):
        """Pseudo-healthy volumes (B, 1, X, Y, Z) in [0, 1], no erasing; ``t`` and ``generator`` are ignored."""
        if volumes.shape[-1] > self.config.depth_slices:
            warnings.warn(
                f"the brain spans {volumes.shape[-1]} axial slices, more than the VAE3D's "
                f"{self.config.depth_slices}; the outer slices are not reconstructed (no score there)",
                ScanWarning,
                stacklevel=3,  # past torch.no_grad's wrapper, to the caller
            )
        return self(volumes).clamp(0.0, 1.0)
