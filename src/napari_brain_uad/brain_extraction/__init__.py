"""Brain extraction for scans with the skull on, with deepbet's published networks.

deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using convolutional
neural networks", Computers in Biology and Medicine 2024; MIT licence) ships two trained 3D
LinkNets inside its 10 MB wheel, so nothing is downloaded at run time. Its own loader runs
``torch.jit.load`` on them, which executes the TorchScript code in the files; here the weights
are read as tensors only (``archive.py``), checked against their SHA256 first, and loaded into
the network defined in ``network.py``. The pipeline is deepbet 1.0.2's, written here:

1. the scan in canonical (RAS) voxel order, NaN and infinities set to 0;
2. coarse pass: the whole volume resized to 128³ (nearest neighbour, whatever its voxel size),
   intensities clipped to the 0.5th-99.5th percentile of that small volume and mapped to [0, 1],
   then standardised and given mean 0.449 and spread 0.226 (the statistics deepbet trained
   with); the brain probability above 0.5, its largest 26-connected component, and the box
   around it where at least 2 % of a plane is brain, grown by 10 % of its size on each side;
3. fine pass: the box resized to 256³, normalised with the same percentiles, its brain
   probability resized back onto the box;
4. probability above 0.5, the largest connected component inside the box, its holes filled;
   back in the scan's own orientation.

Measured here (2-core CPU, benchmarks/bench_brain_extraction.py): Dice 0.981 (0.974 at worst)
against the brain masks of 6 held-out IXI scans, 2 s a scan on an idle machine. Published for T1; on the raw clinical T2 and FLAIR scans of
``mslub_longitudinal_raw`` its masks look as good as on T1 (1.3–1.6 L, no leak into skull or
eyes; a few mm into the orbital roof on one thick-slice T2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional

from ..errors import BrainUADError, Cancelled
from .archive import ArchiveError, read_state_dict
from .network import LinkNet3d

# The two networks in deepbet 1.0.2's wheel (installed under site-packages/data/models/).
WEIGHTS = {
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
}
COARSE_SHAPE = (128, 128, 128)
FINE_SHAPE = (256, 256, 256)
PERCENTILES = (0.005, 0.995)
TRAINING_MEAN, TRAINING_SPREAD = 0.449, 0.226
BRAIN_PROBABILITY = 0.5
BOX_PLANE_SHARE = 0.02  # a plane belongs to the brain's box when this share of it is brain
BOX_MARGIN = 0.1  # of the box's size, on each side
EXTRACTOR = "deepbet 1.0.2"
# Shares of the progress bar: the fine pass at 256³ costs about eight times the coarse one at 128³.
COARSE_SHARE, FINE_END = 0.1, 0.95

_CONNECTED_26 = np.ones((3, 3, 3), dtype=bool)


class BrainExtractionUnavailable(BrainUADError, ValueError):
    """The extractor's weights are missing or not the published ones."""


def weights_file(name: str) -> Path:
    """The installed deepbet weight file ``name``, checked against its published SHA256."""
    try:
        path = Path(str(metadata.distribution("deepbet").locate_file(f"data/models/{name}")))
    except metadata.PackageNotFoundError:
        raise BrainExtractionUnavailable(
            "brain extraction needs the deepbet package (pip install deepbet==1.0.2), or give a brain mask"
        ) from None
    if not path.is_file():
        raise BrainExtractionUnavailable(f"deepbet's weights {path} are missing; reinstall deepbet==1.0.2")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS[name]:
        raise BrainExtractionUnavailable(
            f"{path} is not deepbet 1.0.2's published network (its SHA256 differs); reinstall deepbet==1.0.2"
        )
    return path


@lru_cache(maxsize=2)
def networks(device: str = "cpu") -> tuple[LinkNet3d, LinkNet3d]:
    """The coarse (bounding box) and fine networks, loaded once per device."""
    loaded = []
    for name in ("bbox_model.pt", "model.pt"):
        network = LinkNet3d()
        try:
            network.load_state_dict(read_state_dict(weights_file(name)), strict=True)
        except (ArchiveError, RuntimeError) as error:
            raise BrainExtractionUnavailable(f"deepbet's {name} does not load: {error}") from None
        loaded.append(network.eval().to(device))
    return loaded[0], loaded[1]


def extract_brain(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The brain mask (bool, the scan's grid) of a scan with its skull on.

    Raises :class:`BrainExtractionUnavailable` without the weights; an empty result (no head in
    the scan) comes back empty, for the caller to judge. ``progress(fraction)`` moves layer by
    layer through both networks, and ``cancelled()`` is polled as often (it raises
    :class:`~napari_brain_uad.errors.Cancelled`), so a user waits a fraction of a second, not a
    whole pass."""
    coarse_network, fine_network = networks(device)

    def watch(network, start: float, end: float):
        return _LayerWatch(network, progress, cancelled, start, end)

    orientation = nib.io_orientation(affine)
    canonical = nib.apply_orientation(np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0,
                                                    neginf=0.0), orientation)
    volume = torch.from_numpy(np.ascontiguousarray(canonical)).to(device)

    small = _resized(volume, COARSE_SHAPE)
    low, high = torch.quantile(small.flatten(), torch.tensor(PERCENTILES, device=device))
    if not high > low:  # no contrast at all: nothing to find
        return np.zeros(np.asarray(data).shape, dtype=bool)
    with watch(coarse_network, 0.0, COARSE_SHARE):
        coarse = _brain_probability(coarse_network, small, low, high)
    coarse_brain = _largest_component(coarse.cpu().numpy() > BRAIN_PROBABILITY)
    if not coarse_brain.any():
        return np.zeros(np.asarray(data).shape, dtype=bool)
    box = _box(coarse_brain, tuple(canonical.shape))

    with watch(fine_network, COARSE_SHARE, FINE_END):
        fine = _brain_probability(fine_network, _resized(volume[box], FINE_SHAPE), low, high)
    mask = np.zeros(canonical.shape, dtype=bool)
    inside = _resized(fine, tuple(canonical[box].shape)).cpu().numpy() > BRAIN_PROBABILITY
    mask[box] = ndimage.binary_fill_holes(_largest_component(inside))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), orientation)
    if progress is not None:
        progress(1.0)
    return nib.apply_orientation(mask, back).astype(bool)


def _resized(volume: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    return functional.interpolate(volume[None, None], size=shape, mode="nearest-exact")[0, 0]


class _LayerWatch:
    """While active, before each layer of ``network`` runs: checks ``cancelled`` and reports
    the share of layers done, mapped onto [start, end] of the extraction's progress."""

    def __init__(self, network: torch.nn.Module, progress, cancelled, start: float, end: float):
        self.layers = [module for module in network.modules() if not list(module.children())]
        self.progress, self.cancelled, self.start, self.end = progress, cancelled, start, end
        self.done, self.handles = 0, []

    def _before_layer(self, module, inputs):
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("brain extraction cancelled")
        self.done += 1
        if self.progress is not None:
            self.progress(self.start + (self.end - self.start) * min(self.done / len(self.layers), 1.0))

    def __enter__(self):
        if self.progress is not None or self.cancelled is not None:
            self.handles = [layer.register_forward_pre_hook(self._before_layer) for layer in self.layers]
        return self

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()
        return False


def _brain_probability(network: LinkNet3d, volume: torch.Tensor, low, high) -> torch.Tensor:
    scaled = ((volume - low) / (high - low)).clamp(0.0, 1.0)
    standard = (scaled - scaled.mean()) / scaled.std()
    with torch.no_grad():
        return network((TRAINING_SPREAD * standard + TRAINING_MEAN)[None, None])[0, 1]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=_CONNECTED_26)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _box(brain: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The brain's box on the full grid: planes of the coarse mask with at least
    BOX_PLANE_SHARE brain, scaled up, grown by BOX_MARGIN of its size on each side."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        planes = np.flatnonzero(brain.mean(axis=others) > BOX_PLANE_SHARE)
        if planes.size == 0:  # a sliver of brain thinner than the share everywhere
            planes = np.flatnonzero(brain.any(axis=others))
        scale = shape[axis] / brain.shape[axis]
        centre = scale * (planes.max() + 1 + planes.min()) / 2
        size = (1 + 2 * BOX_MARGIN) * scale * (planes.max() + 1 - planes.min())
        centre, size = round(centre), round(size)
        box.append(slice(max(0, int(centre - size / 2)), min(shape[axis], int(centre + size / 2))))
    return tuple(box)
