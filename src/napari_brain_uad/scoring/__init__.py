"""Anomaly scores: maps of how unlike its reconstruction(s) each voxel of a scan is.

Step 4 of the data flow, after the reconstructions (``analysis.py`` runs the steps in order).
Every function takes numpy arrays or torch tensors, 2D slices ``(X, Y)`` or 3D volumes
``(X, Y, Z)`` whose axial slices are ``volume[:, :, k]`` (model space), and returns the same
kind as ``image``: a numpy array for a numpy image, a tensor on the image's device for a tensor
(work runs on the GPU when the inputs are there).
Floating inputs keep their precision (float64 stays float64); anything else gives float32.

Scores are "higher = more anomalous" maps, except :func:`ssim_map`, which returns the
similarity itself (1 = identical).

Masks (``mask``, a boolean or 0/1 array of the image's shape, usually the brain mask) never
change the numbers computed inside the mask for the SSIM family; they only set the output
outside it: SSIM 1 there, hence score 0. For the Mahalanobis family the mask also selects the
pixels whose covariance is estimated (see :func:`mahalanobis`). An empty mask is an error.

The registry :data:`SCORERS` lists every scorer with the input it needs (one reconstruction or
N samples) so the widget and the command line need not hard-code them; :func:`score` calls
any of them by name with one convention. Model kinds with a score of their own (SADM, PHANES)
define it in their module and register it (see ``registry``).

One module per task: ``arrays`` (inputs and outputs), ``filters`` (Gaussian kernels and the
filter engine, shared with the model kinds), ``residual``, ``ssim``, ``mahalanobis`` (scores
against N samples) and ``registry``. The names below are re-exported so that
``from napari_brain_uad.scoring import X`` keeps working.
"""

from __future__ import annotations

from .arrays import ArrayLike, ensemble_mean
from .filters import SMOOTH_TRUNCATE, SSIM_TRUNCATE, gaussian_kernel, mirrored_indices
from .mahalanobis import mahalanobis, mhd_ssim, s_mean
from .registry import (
    LESION_DIRECTION_OF_MODALITY,
    SAMPLES_FOR_DISTRIBUTION,
    SCORERS,
    Scorer,
    lesion_direction_scorer,
    register_scorer,
    score,
    scorer_names,
)
from .residual import LESION_DIRECTIONS, residual
from .ssim import SSIM_ENS_SIGMAS, SSIM_K1, SSIM_K2, ssim_ens, ssim_map

__all__ = [
    "ArrayLike",
    "LESION_DIRECTIONS",
    "LESION_DIRECTION_OF_MODALITY",
    "SAMPLES_FOR_DISTRIBUTION",
    "SCORERS",
    "SMOOTH_TRUNCATE",
    "SSIM_ENS_SIGMAS",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_TRUNCATE",
    "Scorer",
    "ensemble_mean",
    "gaussian_kernel",
    "lesion_direction_scorer",
    "mahalanobis",
    "mhd_ssim",
    "mirrored_indices",
    "register_scorer",
    "residual",
    "s_mean",
    "score",
    "scorer_names",
    "ssim_ens",
    "ssim_map",
]
