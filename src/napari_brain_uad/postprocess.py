"""From an anomaly map to a segmentation: step 5 of the data flow, as the papers do it.

1. ``prepare`` (once per map, the slow part): median filter 5 x 5 x 5, then the brain mask is
   eroded slice by slice with a 2D cross (iterations = in-plane size // 25, 3 at 96 x 96) and the
   map is set to 0 outside the eroded mask. The erosion removes the rim of the brain, where every
   reconstruction model leaves a bright residual that is not an anomaly. Where a paper says
   otherwise for its score, its scorer declares it (``scoring.Scorer``): PHANES's map is used
   as it is (no median, no erosion); SADM's segmentation term is added after the median.
2. ``FilteredMap.mask_at`` (per threshold, milliseconds): ``map > threshold`` inside the eroded
   mask, then connected components with 26-connectivity, dropping those of at most 7 voxels.

A slider in the widget only repeats step 2. Which threshold to use — chosen on validation data,
stored with the model, picked by name — is the business of ``thresholds``.

Convention throughout: a voxel is anomalous when its score is strictly greater than the threshold
(as in the reference code), so a threshold at or above the maximum score gives an empty mask.
Volumes are model-space arrays (X, Y, Z) with axial slices ``volume[:, :, k]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from .metrics import _as_numpy, _as_scores

MEDIAN_SIZE = 5
MIN_COMPONENT_VOXELS = 7  # components of this many voxels or fewer are dropped
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
# When at most this share of the brain's box lies above the threshold (thresholds near the
# healthy ones, where a reader moves the slider: a few % of the brain), its components are found
# on a graph of those voxels alone, several times faster than labelling the whole box; above it,
# labelling the box is faster. Both give the same components, numbered alike.
_SPARSE_SHARE = 0.05
# A 2D cross in the axial plane and nothing across slices: binary erosion with it erodes each
# axial slice on its own, in one call for the whole volume.
_AXIAL_CROSS = ndimage.generate_binary_structure(2, 1)[:, :, np.newaxis]


# ----------------------------------------------------------------------------------------------
# input checks


def _check_map(score_map, name: str = "anomaly map") -> np.ndarray:
    values = _as_numpy(score_map)
    if values.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (X, Y, Z), got shape {values.shape}")
    return _as_scores(values, name)


def _check_mask(mask, shape: tuple[int, ...], name: str = "brain mask") -> np.ndarray:
    values = _as_numpy(mask)
    if values.shape != tuple(shape):
        raise ValueError(f"{name} has shape {values.shape} but the anomaly map has shape {tuple(shape)}")
    if values.dtype != bool:
        if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
            raise ValueError(f"{name} contains NaN values")
        values = values != 0
    if not values.any():
        raise ValueError(f"{name} is empty: no voxel is inside the brain")
    return values


def _check_threshold(threshold) -> np.float64:
    # A float64 scalar, not a Python float: numpy would round a Python float to the float32 of
    # the map before comparing, and a threshold chosen between two float32 scores (as the
    # metrics do) could then land on one of them.
    value = np.float64(threshold)
    if np.isnan(value):
        raise ValueError("threshold is NaN")
    return value


def _check_spacing(spacing_mm) -> tuple[float, float, float]:
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"voxel spacing must be three positive numbers in mm, got {spacing_mm!r}")
    return tuple(float(s) for s in spacing)


# ----------------------------------------------------------------------------------------------
# the expensive part, once per map


def erosion_iterations(in_plane_shape: int | Sequence[int]) -> int:
    """Erosion iterations for slices of this size: in-plane size // 25 (3 at 96 x 96).

    For a non-square slice the smaller side counts.
    """
    size = int(np.min(np.atleast_1d(in_plane_shape)))
    return size // 25


def erode_brain_mask(brain_mask, iterations: int | None = None) -> np.ndarray:
    """The brain mask eroded per axial slice with a 2D cross (4-neighbourhood).

    ``iterations=None`` uses :func:`erosion_iterations` of the in-plane shape; 0 returns a copy.
    """
    mask = _as_numpy(brain_mask)
    if mask.ndim != 3:
        raise ValueError(f"brain mask must be a 3D volume (X, Y, Z), got shape {mask.shape}")
    mask = mask.astype(bool)
    if iterations is None:
        iterations = erosion_iterations(mask.shape[:2])
    if iterations < 0:
        raise ValueError(f"erosion iterations must be >= 0, got {iterations}")
    if iterations == 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, structure=_AXIAL_CROSS, iterations=int(iterations))


def min_size_in_voxels(min_size_ml: float, spacing_mm) -> float:
    """The largest dropped component size, in voxels (not rounded), for a size given in mL."""
    spacing = _check_spacing(spacing_mm)
    if not np.isfinite(min_size_ml) or min_size_ml < 0:
        raise ValueError(f"minimum component size must be a number of mL >= 0, got {min_size_ml!r}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return float(min_size_ml) / voxel_ml


def remove_small_components(mask, min_size_voxels: float = MIN_COMPONENT_VOXELS) -> np.ndarray:
    """``mask`` without its 26-connected components of at most ``min_size_voxels`` voxels."""
    mask = _as_numpy(mask).astype(bool, copy=False)
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY_26)
    return _keep_large(labels, min_size_voxels)


def _keep_large(labels: np.ndarray, min_size_voxels: float) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    keep = sizes > min_size_voxels
    keep[0] = False  # label 0 is the background
    return keep[labels]


@dataclass(frozen=True, eq=False)
class FilteredMap:
    """An anomaly map after median filtering and brain masking, ready to be thresholded.

    ``values`` is the filtered map, 0 outside ``region`` (the eroded brain mask). Thresholding and
    component removal work on the bounding box of ``region`` only, which is all that can be
    non-zero; this is what keeps a threshold change cheap.
    """

    values: np.ndarray = field(repr=False)  # float32 (X, Y, Z)
    region: np.ndarray = field(repr=False)  # bool (X, Y, Z): the eroded brain mask
    brain_mask: np.ndarray = field(repr=False)  # bool (X, Y, Z): as given
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    median: bool = True
    iterations: int = 3
    _box: tuple[slice, slice, slice] = field(init=False, repr=False)
    _padded_scores: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if self.values.shape != self.region.shape or not self.region.any():
            raise ValueError("a FilteredMap needs a non-empty region of the same shape as its values")
        box = ndimage.find_objects(self.region.astype(np.uint8))[0]
        # Outside the region the score is -inf inside the box, so "score > threshold" needs no
        # second comparison with the mask, for any finite threshold. A border of one -inf voxel
        # around the box lets the graph of voxels above a threshold find a voxel's neighbours by
        # adding a fixed offset to its index: a voxel above is never on the border, so no offset
        # wraps onto another row.
        padded = np.full(tuple(s.stop - s.start + 2 for s in box), -np.inf, dtype=np.float32)
        padded[1:-1, 1:-1, 1:-1] = np.where(self.region[box], self.values[box], -np.inf)
        object.__setattr__(self, "_box", box)
        object.__setattr__(self, "_padded_scores", padded)

    @property
    def _boxed_scores(self) -> np.ndarray:
        return self._padded_scores[1:-1, 1:-1, 1:-1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.values.shape

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def scores(self) -> np.ndarray:
        """The filtered scores of the voxels inside the region (1D)."""
        return self.values[self.region]

    def score_range(self) -> tuple[float, float]:
        scores = self._boxed_scores[np.isfinite(self._boxed_scores)]
        return float(scores.min()), float(scores.max())

    def _max_dropped(self, min_size_voxels: float, min_size_ml: float | None) -> float:
        if min_size_ml is not None:
            # A small relative margin so a component of exactly min_size_ml (up to rounding of
            # the spacing product) counts as "at most" and is dropped.
            return min_size_in_voxels(min_size_ml, self.spacing_mm) * (1 + 1e-9)
        if not min_size_voxels >= 0:
            raise ValueError(f"minimum component size must be >= 0 voxels, got {min_size_voxels!r}")
        return float(min_size_voxels)

    def _kept_components(self, threshold, min_size_voxels, min_size_ml) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The voxels of the kept components: their indices in the (unpadded) box, raveled and
        ascending; each one's component, numbered 0, 1, ... in the raster order of the
        components' first voxels; and each component's size."""
        above = self._padded_scores > _check_threshold(threshold)
        count = int(np.count_nonzero(above))
        if count <= _SPARSE_SHARE * above.size:
            points = np.flatnonzero(above)
            component = _components_of_points(points, above.shape)
            points = _unpadded_index(points, above.shape)
        else:
            labels, _ = ndimage.label(above[1:-1, 1:-1, 1:-1], structure=_CONNECTIVITY_26)
            labels = labels.ravel()
            points = np.flatnonzero(labels)
            component = labels[points] - 1
        sizes = np.bincount(component)
        keep = sizes > self._max_dropped(min_size_voxels, min_size_ml)
        kept_points = keep[component]
        renumber = np.cumsum(keep) - 1  # kept components renumbered 0, 1, ... in the same order
        return points[kept_points], renumber[component[kept_points]], sizes[keep]

    def _unbox(self, points: np.ndarray, values) -> np.ndarray:
        """A volume of the map's shape holding ``values`` at the box's raveled ``points``."""
        boxed = np.zeros(self._boxed_scores.shape, dtype=np.asarray(values).dtype)
        boxed.ravel()[points] = values
        full = np.zeros(self.shape, dtype=boxed.dtype)
        full[self._box] = boxed
        return full

    def mask_at(
        self, threshold: float, min_size_voxels: float = MIN_COMPONENT_VOXELS, min_size_ml: float | None = None
    ) -> np.ndarray:
        """Binary anomaly mask: score > threshold, components of <= min size removed.

        ``min_size_ml``, when given, replaces ``min_size_voxels`` (converted with ``spacing_mm``).
        """
        points, _, _ = self._kept_components(threshold, min_size_voxels, min_size_ml)
        return self._unbox(points, np.True_)

    def labels_at(
        self, threshold: float, min_size_voxels: float = MIN_COMPONENT_VOXELS, min_size_ml: float | None = None
    ) -> np.ndarray:
        """The kept components as an int32 label volume, numbered 1, 2, ... from the largest."""
        points, component, sizes = self._kept_components(threshold, min_size_voxels, min_size_ml)
        # Largest first; equal sizes in raster order (stable sort), so the numbering is reproducible.
        order = np.argsort(-sizes, kind="stable")
        number = np.empty(sizes.size, dtype=np.int32)
        number[order] = np.arange(1, sizes.size + 1, dtype=np.int32)
        return self._unbox(points, number[component])

    def findings(
        self, threshold: float, min_size_voxels: float = MIN_COMPONENT_VOXELS, min_size_ml: float | None = None
    ) -> list[dict]:
        """One row per kept component, largest first; ``label`` matches :meth:`labels_at`."""
        return findings_table(self.labels_at(threshold, min_size_voxels, min_size_ml), self.values, self.spacing_mm)


def _components_of_points(points: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """26-connected components of a few voxels given by their raveled indices (ascending) in a
    volume of ``shape`` whose border holds none of them: each voxel is joined to those of its
    13 forward neighbours that are among them. Returns each point's component, numbered in the
    raster order of each one's first voxel (as ``ndimage.label`` numbers them)."""
    if points.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Each voxel of the volume -> its point's number, or -1: a neighbour is found by one lookup.
    number_of = np.full(int(np.prod(shape)), -1, dtype=np.int32)
    number_of[points] = np.arange(points.size, dtype=np.int32)
    rows, columns = shape[1] * shape[2], shape[2]  # the raveled steps of one row and one column
    sources, targets = [], []
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                offset = dz * rows + dy * columns + dx
                if offset <= 0:
                    continue  # each pair once: from the voxel earlier in raster order
                neighbour = number_of[points + offset]
                found = np.flatnonzero(neighbour >= 0)
                sources.append(found)
                targets.append(neighbour[found])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = sparse.csr_matrix((np.ones(sources.size, dtype=np.int8), (sources, targets)),
                              shape=(points.size, points.size))
    # Components are numbered as their lowest node is met, and nodes are in raster order.
    _, component = csgraph.connected_components(graph, directed=False)
    return component


def _unpadded_index(points: np.ndarray, padded_shape: tuple[int, int, int]) -> np.ndarray:
    """Raveled indices in a volume padded by one voxel on every side, as indices in the volume."""
    z, y, x = np.unravel_index(points, padded_shape)
    inner = tuple(n - 2 for n in padded_shape)
    return np.ravel_multi_index((z - 1, y - 1, x - 1), inner)


def prepare(
    score_map,
    brain_mask,
    *,
    median: bool = True,
    iterations: int | None = None,
    spacing_mm=(2.0, 2.0, 2.0),
    added_after_median=None,
) -> FilteredMap:
    """Median-filter ``score_map`` (5 x 5 x 5, unless ``median=False``) and keep it only inside
    the brain mask eroded per axial slice (``iterations=None``: in-plane size // 25; 0: no
    erosion).

    As in the reference code the median runs on the map as given, before masking; the erosion
    then discards the rim, where the median mixed in voxels from outside the brain.
    ``added_after_median`` is a part of ``score_map`` the median must leave alone (SADM's
    segmentation term, ``scoring.Scorer.after_median``): the median filters the rest, and the
    part is added back.
    """
    values = _check_map(score_map)
    mask = _check_mask(brain_mask, values.shape)
    spacing = _check_spacing(spacing_mm)
    if iterations is None:
        iterations = erosion_iterations(values.shape[:2])
    region = erode_brain_mask(mask, iterations)
    if not region.any():
        raise ValueError(
            f"the brain mask ({int(mask.sum())} voxels) is empty after {iterations} erosion iterations; "
            "pass a smaller `iterations`"
        )
    values = values.astype(np.float32, copy=False)
    if median:
        if added_after_median is None:
            values = ndimage.median_filter(values, size=MEDIAN_SIZE)
        else:
            added = _check_map(added_after_median, "part added after the median").astype(np.float32, copy=False)
            if added.shape != values.shape:
                raise ValueError(f"the part added after the median has shape {added.shape}, the map {values.shape}")
            values = ndimage.median_filter(values - added, size=MEDIAN_SIZE) + added
    filtered = np.where(region, values, np.float32(0)).astype(np.float32)
    return FilteredMap(filtered, region, mask, spacing, bool(median), int(iterations))


def postprocess(
    score_map,
    brain_mask,
    threshold: float,
    *,
    median: bool = True,
    min_size_voxels: float = MIN_COMPONENT_VOXELS,
    min_size_ml: float | None = None,
    spacing_mm=(2.0, 2.0, 2.0),
) -> np.ndarray:
    """All of it at once: :func:`prepare` followed by :meth:`FilteredMap.mask_at`."""
    filtered = prepare(score_map, brain_mask, median=median, spacing_mm=spacing_mm)
    return filtered.mask_at(threshold, min_size_voxels, min_size_ml)


def findings_table(labels, scores, spacing_mm=(2.0, 2.0, 2.0)) -> list[dict]:
    """One row per label > 0 of ``labels``: its voxel count, volume in mL, mean and max of
    ``scores`` over it, and its centre (the mean voxel index, unweighted), in label order."""
    labels = _as_numpy(labels)
    scores = _as_numpy(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"labels have shape {labels.shape} but scores have shape {scores.shape}")
    voxel_ml = float(np.prod(_check_spacing(spacing_mm))) / 1000.0
    # Only the labelled voxels matter, usually a small part of the volume.
    coordinates = np.nonzero(labels)
    owners = labels[coordinates].astype(np.intp)
    if owners.size == 0:
        return []
    if owners.min() < 0:
        raise ValueError("labels must be non-negative integers (0 is the background)")
    values = scores[coordinates].astype(np.float64)
    n = int(owners.max()) + 1
    counts = np.bincount(owners, minlength=n)
    present = np.flatnonzero(counts)
    sums = np.bincount(owners, weights=values, minlength=n)
    maxima = np.full(n, -np.inf)
    np.maximum.at(maxima, owners, values)
    centres = np.stack([np.bincount(owners, weights=c, minlength=n) for c in coordinates], axis=1)
    rows = []
    for label in present:
        count = int(counts[label])
        rows.append(
            {
                "label": int(label),
                "voxels": count,
                "volume_ml": count * voxel_ml,
                "mean_score": float(sums[label] / count),
                "max_score": float(maxima[label]),
                "centre_voxel": [float(c) for c in centres[label] / count],
            }
        )
    return rows
