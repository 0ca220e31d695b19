"""pDDPM: patched diffusion model - only one patch is noised, the rest of the slice is context.

Behrendt et al., "Patched Diffusion Models for Unsupervised Anomaly Detection in Brain MRI"
(thesis sec. 3.4.2 and ch. 8.2). With a binary patch mask M_p the network input is

    x̃_t = x_t ⊙ M_p + x0 ⊙ ¬M_p                                   (paper eq. 3)

- the whole slice, noised to level t inside the patch and clean outside - and it predicts x0.
Training draws the timestep uniformly ("we uniformly sample t ∈ [1, T]") and the patch
uniformly from a fixed grid ("From this grid, we uniformly sample an index k"; fixed sampling
beat random positions in Table 1), with the loss only inside the patch,
L_p = |(x0 − x̃0_rec) ⊙ M_p| (the best row of Table 1, "fixed sampling + L_p").

At test time every grid patch is noised and denoised in turn "using a sliding window approach"
and the denoised patches are stitched, averaging "in the case of overlapping patches". The
grid's positions along each axis start at 0, step ``patch_stride`` and end with the last
position clamped to the border, so the grid always covers the whole slice; with the default
stride (= patch size, as in the authors' code) 96 pixels and patches of 48 give 2×2 patches.
The default patch size 48 = H/2 is the paper's ("Unless stated otherwise ... h = w = H/2 = W/2 =
48"; 60 scored best in its ablation, Fig. 3).

Everything else - U-Net, linear β schedule, one-step x0 prediction, noise kind, noise-level
ensembles and mDDPM masking - comes from :class:`DDPM`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..preprocess import ModelSpaceSpec
from .base import random_integers
from .ddpm import DDPM, DDPMConfig

__all__ = ["PDDPM", "PDDPMConfig", "grid_positions"]


@dataclass(frozen=True)
class PDDPMConfig(DDPMConfig):
    """DDPM hyper-parameters plus the patch grid.

    ``patch_stride`` None means stride = patch size: the non-overlapping grid of the authors'
    code. A smaller stride gives overlapping patches, averaged where they overlap at test time.
    """

    patch_size: int = 48
    patch_stride: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be at least 1 pixel, not {self.patch_size}")
        if self.patch_stride is not None and not 1 <= self.patch_stride <= self.patch_size:
            raise ValueError(
                f"patch_stride must be between 1 and patch_size ({self.patch_size}), not {self.patch_stride}"
            )

    @property
    def stride(self) -> int:
        return self.patch_size if self.patch_stride is None else self.patch_stride


def grid_positions(size: int, patch: int, stride: int) -> list[int]:
    """Start positions of the patches along one axis of ``size`` pixels: 0, stride, 2·stride, ...
    and a last one clamped to ``size - patch`` so that the patches cover every pixel."""
    if not 1 <= patch <= size:
        raise ValueError(f"a patch of {patch} pixels does not fit an axis of {size}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


class PDDPM(DDPM):
    """A DDPM that noises and denoises one patch of the slice at a time."""

    kind = "pddpm"
    config_class = PDDPMConfig
    # Inputs of one network call at test time: K patches × B slices are split into chunks.
    # None: 64 on a GPU (large batches fill it), 8 on a CPU, where measured time per input grows
    # with the batch (cache-bound: 32 ms at 8, 92 ms at 64 on a 2-core EPYC).
    max_inputs_per_call: int | None = None

    def __init__(self, config: PDDPMConfig = PDDPMConfig(), spec: ModelSpaceSpec = ModelSpaceSpec()):
        super().__init__(config, spec)
        if config.patch_size > min(spec.in_plane):
            raise ValueError(f"patch_size {config.patch_size} does not fit the model's in-plane size {spec.in_plane}")

    def patch_masks(self, height: int, width: int, device=None) -> torch.Tensor:
        """(K, 1, H, W) bool, one mask per grid patch (row-major)."""
        rows = grid_positions(height, self.config.patch_size, self.config.stride)
        cols = grid_positions(width, self.config.patch_size, self.config.stride)
        size = self.config.patch_size
        masks = torch.zeros((len(rows) * len(cols), 1, height, width), dtype=torch.bool, device=device)
        for index, (top, left) in enumerate((top, left) for top in rows for left in cols):
            masks[index, :, top : top + size, left : left + size] = True
        return masks

    def patched_input(
        self, slices: torch.Tensor, patch_mask: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The network's input in [-1, 1]: ``slices`` noised to ``timesteps`` inside ``patch_mask``
        (broadcastable bool), clean outside (paper eq. 3)."""
        clean = slices * 2.0 - 1.0
        noised = self.scheduler.add_noise(clean, noise, timesteps)
        return torch.where(patch_mask, noised, clean)

    def predict_patched(
        self,
        slices: torch.Tensor,
        patch_mask: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0 in [0, 1] predicted from ``slices`` noised inside ``patch_mask``. ``clean`` is the
        un-noised input handed to conditioned variants (default ``slices``)."""
        inputs = self.patched_input(slices, patch_mask, timesteps, noise)
        return (self.denoise(inputs, timesteps, slices if clean is None else clean) + 1.0) / 2.0

    @staticmethod
    def patch_loss(predicted: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over the pixels inside ``patch_mask`` only (the paper's L_p)."""
        weights = patch_mask.expand_as(target).to(target.dtype)
        return ((predicted - target).abs() * weights).sum() / weights.sum().clamp_min(1.0)

    def draw_training_patches(
        self, batch: int, height: int, width: int, generator: torch.Generator | None, device
    ) -> torch.Tensor:
        """(B, 1, H, W) bool: one grid patch per slice, drawn uniformly."""
        masks = self.patch_masks(height, width, device)
        return masks[random_integers(0, masks.shape[0], (batch,), generator, device)]

    def training_loss(self, slices, brain_mask=None, generator=None):
        """L1 inside one random grid patch per slice, noised at a uniformly drawn level; the
        network sees the rest of the (mDDPM-masked, if configured) slice clean."""
        batch, _, height, width = slices.shape
        timesteps = random_integers(0, self.config.timesteps, (batch,), generator, slices.device)
        patch_mask = self.draw_training_patches(batch, height, width, generator, slices.device)
        inputs = self.mask_for_training(slices, brain_mask, generator)
        predicted = self.predict_patched(inputs, patch_mask, timesteps, self.draw_noise(slices, generator))
        return self.patch_loss(predicted, slices, patch_mask)

    @torch.no_grad()
    def reconstruct_at(self, slices: torch.Tensor, t: int, generator: torch.Generator | None) -> torch.Tensor:
        """Every grid patch of every slice noised to ``t`` in turn and denoised; each prediction
        kept inside its patch and the patches averaged where they overlap.

        One noise field per slice serves all its patches (as in the authors' code). The K × B
        patched inputs go through the network in chunks of at most ``max_inputs_per_call``.
        """
        batch, _, height, width = slices.shape
        masks = self.patch_masks(height, width, slices.device)
        noise = self.draw_noise(slices, generator)
        count = masks.shape[0] * batch
        chunk = self.max_inputs_per_call or (8 if slices.device.type == "cpu" else 64)
        stitched = torch.zeros_like(slices)
        for start in range(0, count, chunk):
            # Input i of the flattened (patch, slice) grid is slice i % B noised in patch i // B.
            flat = torch.arange(start, min(start + chunk, count), device=slices.device)
            patch_index, slice_index = flat // batch, flat % batch
            chunk_masks = masks[patch_index]
            timesteps = torch.full((flat.numel(),), t, dtype=torch.long, device=slices.device)
            predicted = self.predict_patched(slices[slice_index], chunk_masks, timesteps, noise[slice_index])
            stitched.index_add_(0, slice_index, predicted * chunk_masks)
        coverage = masks.sum(dim=0).to(slices.dtype)  # ≥ 1 everywhere: the grid covers the slice
        return (stitched / coverage).clamp(0.0, 1.0)
