"""Segmentation and detection metrics of the papers, voxel-wise, on numpy arrays.

- Dice of two masks, and Dice of a map thresholded at a given value (``score > threshold``).
- [Dice]: the best Dice over all thresholds, an upper bound (the threshold is chosen on the very
  case it is scored on). Exact: every distinct score is tried, using cumulative counts.
- AUPRC: average precision over the voxels in the brain, the same definition as scikit-learn's
  ``average_precision_score``: sum over distinct scores, highest first, of (R_n - R_(n-1)) P_n.
  Per volume (then averaged over cases, as the papers report it) or pooled over volumes.
- l1 inside and outside the lesions (brain only) and their ratio.

How a scan is evaluated with these (which region, which threshold, which post-processing, per
case and over cases) is ``evaluation``'s business.

Every function accepts numpy arrays of any shape (2D slices or 3D volumes) and torch tensors
(copied to the CPU). ``mask`` (e.g. the brain mask) restricts every count to its voxels, the
ground truth included. Ground-truth and mask arrays count as True where non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_numpy(array) -> np.ndarray:
    """numpy arrays as they are; torch tensors (on any device) copied to the CPU."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _as_bool(array, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    values = _as_numpy(array)
    if shape is not None and values.shape != shape:
        raise ValueError(f"{name} has shape {values.shape}, expected {shape} (the shape of the map)")
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        raise ValueError(f"{name} contains NaN values")
    return values != 0


def _as_scores(array, name: str = "anomaly map") -> np.ndarray:
    values = _as_numpy(array)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values ({np.count_nonzero(~np.isfinite(values))} voxels)")
    return values


def _voxels(score_map, truth, mask) -> tuple[np.ndarray, np.ndarray]:
    """The scores (float64) and truth values of the voxels in ``mask`` (all voxels when None)."""
    scores = _as_scores(score_map)
    truth = _as_bool(truth, "ground truth", scores.shape)
    if mask is None:
        return scores.astype(np.float64).ravel(), truth.ravel()
    mask = _as_bool(mask, "mask", scores.shape)
    if not mask.any():
        raise ValueError("mask is empty: no voxel to evaluate")
    return scores[mask].astype(np.float64), truth[mask]


def _pooled_voxels(maps, truths, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, truths = list(maps), list(truths)
    masks = [None] * len(maps) if masks is None else list(masks)
    if not maps:
        raise ValueError("no maps given")
    if not len(maps) == len(truths) == len(masks):
        raise ValueError(f"{len(maps)} maps, {len(truths)} ground truths and {len(masks)} masks: counts differ")
    pairs = [_voxels(m, t, k) for m, t, k in zip(maps, truths, masks)]
    return np.concatenate([s for s, _ in pairs]), np.concatenate([t for _, t in pairs])


# ----------------------------------------------------------------------------------------------
# Dice


def dice(predicted, truth) -> float:
    """2 |P ∩ T| / (|P| + |T|). Two empty masks agree perfectly: their Dice is defined as 1.0
    (a healthy case with nothing predicted is right, not undefined)."""
    predicted = _as_bool(predicted, "prediction")
    truth = _as_bool(truth, "ground truth", predicted.shape)
    return _dice_of_masks(predicted, truth)


def _dice_of_masks(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays already checked (the inner loop of threshold searches)."""
    total = np.count_nonzero(predicted) + np.count_nonzero(truth)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(predicted & truth) / total


def dice_at(score_map, truth, threshold: float, mask=None) -> float:
    """Dice of ``score_map > threshold`` against ``truth``, counted inside ``mask``."""
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    scores, truth = _voxels(score_map, truth, mask)
    return dice(scores > threshold, truth)


def _best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    positives = int(np.count_nonzero(truth))
    if scores.size == 0:
        return 1.0, np.inf
    # Nothing predicted: the threshold at the highest score.
    empty_dice = 1.0 if positives == 0 else 0.0
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    # Thresholding between two distinct scores predicts a prefix of the ranking ending at the
    # last voxel of a run of equal scores.
    run_ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    true_positives = np.cumsum(truth[order])[run_ends]
    predicted = run_ends + 1
    dices = 2.0 * true_positives / (predicted + positives)
    best = int(np.argmax(dices))
    if dices[best] <= empty_dice:
        return empty_dice, float(ranked[0])
    value = float(ranked[run_ends[best]])
    if best + 1 < run_ends.size:
        below = float(ranked[run_ends[best] + 1])
        threshold = 0.5 * (value + below)
        if not below < threshold < value:  # adjacent floats: the lower score itself is exact
            threshold = below
    else:
        threshold = float(np.nextafter(value, -np.inf))
    return float(dices[best]), threshold


def best_dice(score_map, truth, mask=None, *, return_threshold: bool = False):
    """[Dice]: the highest Dice of ``score_map > t`` over every threshold t, inside ``mask``.

    Exact: every distinct score is a candidate. With ``return_threshold=True`` returns
    ``(dice, threshold)``, the threshold lying between the last predicted score and the next one.
    """
    result = _best_dice(*_voxels(score_map, truth, mask))
    return result if return_threshold else result[0]


def best_dice_pooled(maps: Sequence, truths: Sequence, masks: Sequence | None = None, *, return_threshold=False):
    """[Dice] with one threshold for all volumes, over all their voxels pooled."""
    result = _best_dice(*_pooled_voxels(maps, truths, masks))
    return result if return_threshold else result[0]


# ----------------------------------------------------------------------------------------------
# average precision


def _operating_points(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct score, from the highest down (the rule
    is score >= threshold there); empty arrays when the truth has no positive voxel."""
    positives = int(np.count_nonzero(truth))
    if positives == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    # One operating point per distinct score: tied voxels enter together, as in scikit-learn.
    run_ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    true_positives = np.cumsum(truth[order], dtype=np.int64)[run_ends]
    precision = true_positives / (run_ends + 1.0)
    recall = true_positives / positives
    return precision, recall, ranked[run_ends]


def _average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    precision, recall, _ = _operating_points(scores, truth)
    if recall.size == 0:
        return float("nan")
    recall_gain = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_gain * precision))


def precision_recall_curve(score_map, truth, mask=None) -> dict[str, np.ndarray]:
    """The precision-recall curve whose area :func:`auprc` is: ``precision``, ``recall`` and
    ``thresholds`` (voxels with score >= threshold are called anomalous), one point per
    distinct score, highest threshold first."""
    precision, recall, thresholds = _operating_points(*_voxels(score_map, truth, mask))
    return {"precision": precision, "recall": recall, "thresholds": thresholds}


def auprc(score_map, truth, mask=None) -> float:
    """Average precision of the voxels' scores against ``truth``, inside ``mask``.

    Same value as ``sklearn.metrics.average_precision_score(truth[mask], score_map[mask])``.
    NaN when there is no positive voxel (precision-recall is undefined on a healthy case).
    """
    return _average_precision(*_voxels(score_map, truth, mask))


def auprc_pooled(maps: Sequence, truths: Sequence, masks: Sequence | None = None) -> float:
    """Average precision over the voxels of all volumes together (one ranking)."""
    return _average_precision(*_pooled_voxels(maps, truths, masks))


# ----------------------------------------------------------------------------------------------
# l1 inside and outside lesions


def l1_inside_outside(image, reconstruction, truth, mask=None) -> dict:
    """Mean |image - reconstruction| inside the lesions and outside them (both inside ``mask``),
    and their ratio inside / outside (higher: the error concentrates on the lesions).

    Means over no voxels are NaN; the ratio is inf when only the outside error is 0.
    """
    image = _as_scores(image, "image")
    reconstruction = _as_scores(reconstruction, "reconstruction")
    if reconstruction.shape != image.shape:
        raise ValueError(f"reconstruction has shape {reconstruction.shape} but the image has shape {image.shape}")
    error = np.abs(image.astype(np.float64) - reconstruction.astype(np.float64))
    errors, lesion = _voxels(error, truth, mask)
    inside = float(errors[lesion].mean()) if lesion.any() else float("nan")
    outside = float(errors[~lesion].mean()) if (~lesion).any() else float("nan")
    if np.isnan(inside) or np.isnan(outside):
        ratio = float("nan")
    elif outside == 0.0:
        ratio = float("inf") if inside > 0.0 else float("nan")
    else:
        ratio = inside / outside
    return {"l1_inside": inside, "l1_outside": outside, "l1_ratio": ratio}


def l1_ratio(image, reconstruction, truth, mask=None) -> float:
    """Mean l1 error inside the lesions divided by the mean outside them (brain only)."""
    return l1_inside_outside(image, reconstruction, truth, mask)["l1_ratio"]
