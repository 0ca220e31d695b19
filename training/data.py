"""Training data: healthy scans in model space, and the slices each step trains on.

Every scan goes through the core's ``to_model_space`` (the one definition of model space that
inference uses too), so a trained model sees at test time exactly what it saw in training.
Subjects, not slices, are split into training and validation, so no subject's anatomy leaks
into its own validation. Training slices are drawn uniformly with replacement from the slices
that hold brain, as the papers do; the draw for step k depends only on (seed, k, rank), so a
fixed seed gives the same run and a resumed run continues exactly where it stopped.
Volumetric kinds (the 3D VAE) get whole volumes instead (:class:`VolumeSampler`), drawn the
same way.

Brains are found by the rule every door of the plugin uses (``brain_mask.find_brain``: the
given mask, else a skull-stripped scan's own voxels, else extraction), so a raw scan with the
skull on trains on its brain, not its head. A scan may also come with an *exclusion* mask (a
column ``exclude_mask`` of the training list): voxels a model must not learn as normal — a
patient's lesions, or an automatic segmenter's white-matter hyperintensities — are dilated and
left out of the training loss, so a clinic can train on its own patients' scans.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from napari_brain_uad.brain_mask import EXCLUSION_GROWTH_MM, find_brain, grown_mask
from napari_brain_uad.errors import BrainUADError
from napari_brain_uad.evaluation import check_same_grid
from napari_brain_uad.nifti import ScanError, ScanWarning, is_nifti_path, nifti_stem, read_nifti
from napari_brain_uad.models.vae3d import centre_along_depth
from napari_brain_uad.preprocess import ModelSpaceSpec, to_model_space
from napari_brain_uad.scan_list import ScanListError, csv_path, read_csv_rows, scans_in_folder

# A slice trains the model when at least this fraction of it is brain: the outermost slices
# hold a few voxels of brain that teach nothing about anatomy.
MIN_BRAIN_FRACTION = 0.05


class TrainingDataError(BrainUADError, ValueError):
    """The training data cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ScanPair:
    """One training scan, its brain mask (None: found as the plugin finds it) and the mask of
    voxels to leave out of training (None: every brain voxel is healthy)."""

    image: Path
    brain_mask: Path | None
    exclude_mask: Path | None = None
    name: str | None = None  # the subject's name, when the file's own name does not tell it

    @property
    def subject(self) -> str:
        return self.name or nifti_stem(self.image)


@dataclass
class ModelSpaceScan:
    subject: str
    image: np.ndarray  # (Z, H, W) float32 in [0, 1]: axial slices in model space
    brain_mask: np.ndarray  # (Z, H, W) bool
    exclude: np.ndarray | None = None  # (Z, H, W) bool: voxels left out of the loss (dilated)


def find_scans(data: str | Path | Sequence[str | Path], brain_masks: str | Path | None = None) -> list[ScanPair]:
    """The healthy scans of a training run, each with its brain mask.

    ``data`` is a folder of NIfTI files, a list of NIfTI paths, or a CSV file with columns
    ``image`` and (optionally) ``brain_mask`` and ``exclude_mask``. ``brain_masks`` is a folder where the mask of
    ``<subject>_<anything>.nii.gz`` is the file named ``<subject>_<anything else>.nii.gz`` (or
    has the scan's own name). Without masks the brain is found as the plugin finds it.

    Folders and CSV files are read by the plugin's list reader (``scan_list``), so a list means
    the same to training as to the worklist and the cohort; the training-only parts (the
    ``exclude_mask`` and ``subject`` columns, brain masks matched by subject) are added here.
    """
    if isinstance(data, (str, Path)) and Path(data).suffix.lower() == ".csv":
        return _named_by_folder_when_needed(_scans_from_csv(Path(data)))
    if isinstance(data, (str, Path)):
        folder = Path(data)
        if not folder.is_dir():
            raise TrainingDataError(f"{folder}: no such folder (give a folder of NIfTI scans, a list, or a CSV file)")
        # Training reads NIfTI files only (load_model_space), so DICOM series folders are left out.
        images = [entry.scan for entry in scans_in_folder(folder) if is_nifti_path(entry.scan)]
        if not images:
            raise TrainingDataError(f"{folder}: no NIfTI scans (.nii or .nii.gz) in this folder")
    else:
        images = [Path(p) for p in data]
        if not images:
            raise TrainingDataError("the list of training scans is empty")
        for image in images:
            if not image.is_file():
                raise TrainingDataError(f"{image}: file not found")
    if brain_masks is None:
        return _named_by_folder_when_needed([ScanPair(image, None) for image in images])
    return _named_by_folder_when_needed([ScanPair(image, _matching_mask(image, Path(brain_masks))) for image in images])


def _named_by_folder_when_needed(pairs: list[ScanPair]) -> list[ScanPair]:
    """Scans stored one folder per subject under one file name (``Subj1/FLAIR.nii.gz``) are named
    after their folder, so that subjects stay apart in the split and in the model card."""
    stems = [pair.subject for pair in pairs]
    if len(set(stems)) == len(stems):
        return pairs
    named = [replace(pair, name=pair.name or f"{pair.image.parent.name}_{nifti_stem(pair.image)}") for pair in pairs]
    seen: dict[str, Path] = {}
    for pair in named:
        if pair.subject in seen:
            raise TrainingDataError(f"{seen[pair.subject]} and {pair.image} would both be subject {pair.subject!r}; "
                                    "give each scan its own name (a 'subject' column in a CSV list)")
        seen[pair.subject] = pair.image
    return named


def _matching_mask(image: Path, mask_folder: Path) -> Path:
    if not mask_folder.is_dir():
        raise TrainingDataError(f"{mask_folder}: the brain-mask folder does not exist")
    stem = nifti_stem(image)
    subject = stem.rsplit("_", 1)[0] if "_" in stem else stem
    candidates = sorted(
        p for p in mask_folder.iterdir()
        if is_nifti_path(p) and (nifti_stem(p) == stem or nifti_stem(p).startswith(subject + "_"))
    )
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(p.name for p in candidates)
        raise TrainingDataError(
            f"{image}: expected exactly one brain mask named {subject}_*.nii.gz in {mask_folder}, found {found}"
        )
    return candidates[0]


def _scans_from_csv(path: Path) -> list[ScanPair]:
    if not path.is_file():
        raise TrainingDataError(f"{path}: file not found")
    try:
        columns, rows = read_csv_rows(path)
        if not rows or "image" not in columns:
            raise TrainingDataError(f"{path}: a CSV with a header row naming the columns 'image' and 'brain_mask' "
                                    "(and optionally 'exclude_mask') is needed")
        pairs = []
        for line, row in rows:
            if not row.get("image"):
                raise TrainingDataError(f"{path}: a row has no 'image'")
            where = f"{path}, line {line}"
            # Relative to the CSV (so a data folder can move whole), then resolved as training
            # always has: subjects keep the names of the files links point to.
            image, brain_mask, exclude_mask = (
                file.resolve() if file is not None else None
                for file in (csv_path(path, row["image"], where, "image", required=True),
                             csv_path(path, row.get("brain_mask", ""), where, "brain mask"),
                             csv_path(path, row.get("exclude_mask", ""), where, "exclusion mask")))
            for file in (image, brain_mask, exclude_mask):
                if file is not None and not file.is_file():
                    raise TrainingDataError(f"{path}: {file}: file not found")
            pairs.append(ScanPair(image, brain_mask, exclude_mask, row.get("subject") or None))
    except ScanListError as error:
        raise TrainingDataError(str(error)) from None
    return pairs


def split_subjects(scans: Sequence[ScanPair], validation_fraction: float, seed: int) -> tuple[list, list]:
    """Training and validation scans, split by subject with a seeded shuffle (same seed, same split)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise TrainingDataError(f"the validation fraction must be in [0, 1), not {validation_fraction}")
    order = np.random.default_rng(seed).permutation(len(scans))
    count = int(round(validation_fraction * len(scans)))
    if validation_fraction > 0 and count == 0:
        count = 1
    if count >= len(scans):
        raise TrainingDataError(f"{len(scans)} scan(s) are too few to keep {count} for validation")
    validation = sorted((scans[i] for i in order[:count]), key=lambda s: s.subject)
    training = sorted((scans[i] for i in order[count:]), key=lambda s: s.subject)
    return training, validation


def load_model_space(
    scans: Sequence[ScanPair],
    spec: ModelSpaceSpec,
    progress: Callable[[int, int], None] | None = None,
    exclude_dilation_mm: float = EXCLUSION_GROWTH_MM,
) -> list[ModelSpaceScan]:
    """Every scan in model space, as stacks of axial slices (read once, kept in memory).

    The brain is found as every door of the plugin finds it; an exclusion mask is brought into
    model space (any overlap with a model-space voxel counts), grown by ``exclude_dilation_mm``
    and kept inside the brain."""
    loaded = []
    for index, pair in enumerate(scans):
        try:
            with warnings.catch_warnings():
                # Edges cut off and the like matter to a user looking at one scan; in a
                # training set of hundreds they would drown the progress bar.
                warnings.simplefilter("ignore", ScanWarning)
                scan = read_nifti(pair.image)
                given = read_nifti(pair.brain_mask) if pair.brain_mask is not None else None
                brain = find_brain(scan, given)
                volume = to_model_space(scan, brain_mask=brain.mask, spec=spec)
                exclude = None
                if pair.exclude_mask is not None:
                    exclude = _exclusion_in_model_space(read_nifti(pair.exclude_mask), scan, volume,
                                                        exclude_dilation_mm)
        except (ScanError, BrainUADError) as error:
            # Messages name their file already; a brain-size refusal names the scan's.
            message = str(error)
            raise TrainingDataError(message if str(pair.image) in message else f"{pair.image}: {message}") from None
        loaded.append(ModelSpaceScan(
            subject=pair.subject,
            image=np.ascontiguousarray(np.moveaxis(volume.image, 2, 0)),
            brain_mask=np.ascontiguousarray(np.moveaxis(volume.brain_mask, 2, 0)),
            exclude=None if exclude is None else np.ascontiguousarray(np.moveaxis(exclude, 2, 0)),
        ))
        if progress is not None:
            progress(index + 1, len(scans))
    return loaded


def _exclusion_in_model_space(mask, scan, volume, dilation_mm: float) -> np.ndarray:
    """A native exclusion mask as model-space booleans (X, Y, Z), grown by ``dilation_mm``."""
    check_same_grid(mask, scan, "exclusion mask")
    # Any overlap counts: a lesion a quarter of a model-space voxel wide still taints that voxel.
    exclude = volume.transform.to_model((mask.data > 0).astype(np.float32), antialias=False) > 0.01
    return grown_mask(exclude, volume.transform.spacing_mm, dilation_mm) & volume.brain_mask


def thick_slice(stack: np.ndarray, z: int, width: int) -> np.ndarray:
    """Slice ``z`` of a (Z, H, W) stack as a slice ``width`` model-space slices thick shows it:
    the mean of that many neighbours (partial volume, as a 4–8 mm clinical slice looks once
    resampled to model space), the stack's edges repeated."""
    if width <= 1:
        return stack[z]
    return stack[thick_rows(z, width, len(stack))].mean(axis=0, dtype=np.float32)


def thick_rows(z: int, width: int, depth: int) -> np.ndarray:
    """The ``width`` slices a thick slice centred on ``z`` averages (below the centre first when
    ``width`` is even), the stack's edge slices repeated where it runs out."""
    first = z - (width - 1) // 2
    return np.clip(np.arange(first, first + width), 0, depth - 1)


class SliceSampler:
    """Batches of brain-holding axial slices, drawn uniformly with replacement.

    ``batch(step, rank)`` depends only on the seed, the step and the rank: each process of a
    distributed run gets its own slices, and a resumed run draws what the first one would have.
    With ``thick_slices`` (probability, widest width in slices) a drawn slice is, with that
    probability, replaced by the mean of 2 up to that many neighbouring slices, so the model
    learns what thick clinical slices look like in model space.
    """

    def __init__(self, scans: Sequence[ModelSpaceScan], seed: int, min_brain_fraction: float = MIN_BRAIN_FRACTION,
                 thick_slices: tuple[float, int] = (0.0, 1)):
        if not scans:
            raise TrainingDataError("no training scans")
        self.scans = list(scans)
        self.seed = int(seed)
        self.thick_probability, self.thickest = float(thick_slices[0]), int(thick_slices[1])
        index = []
        for scan_number, scan in enumerate(self.scans):
            area = scan.brain_mask.shape[1] * scan.brain_mask.shape[2]
            fraction = scan.brain_mask.reshape(len(scan.brain_mask), -1).sum(axis=1) / area
            index.extend((scan_number, int(z)) for z in np.nonzero(fraction >= min_brain_fraction)[0])
        if not index:
            raise TrainingDataError("no slice of the training scans holds enough brain to train on")
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def has_exclusions(self) -> bool:
        return any(scan.exclude is not None for scan in self.scans)

    def draw(self, step: int, rank: int, batch_size: int, stream: int = 0) -> np.ndarray:
        """Indices for one step; ``stream`` separates uses (0: training, 1: encoder pre-training)."""
        rng = np.random.default_rng([self.seed, stream, step, rank])
        return self.index[rng.integers(0, len(self.index), size=batch_size)]

    def widths(self, step: int, rank: int, batch_size: int, stream: int = 0) -> np.ndarray:
        """How many slices thick each slice of the step is made (1: as it is)."""
        if self.thick_probability <= 0 or self.thickest < 2:
            return np.ones(batch_size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, stream, step, rank, 1])
        thick = rng.random(batch_size) < self.thick_probability
        return np.where(thick, rng.integers(2, self.thickest + 1, size=batch_size), 1)

    def gather(self, chosen: np.ndarray, widths: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) float32 slices and bool brain masks for (scan, slice) pairs."""
        widths = np.ones(len(chosen), dtype=np.int64) if widths is None else widths
        masks = np.stack([self.scans[s].brain_mask[z] for s, z in chosen])[:, None]
        # A thick slice's neighbours reach past its own brain outline; model space is 0 outside the brain.
        images = np.stack([thick_slice(self.scans[s].image, z, w) for (s, z), w in zip(chosen, widths)])[:, None]
        return torch.from_numpy(images * masks), torch.from_numpy(masks)

    def excluded(self, chosen: np.ndarray, widths: np.ndarray | None = None) -> torch.Tensor | None:
        """(B, 1, H, W) bool: the voxels of each slice left out of the loss (for a thick slice,
        those of any slice it averages), or None when no scan has an exclusion mask."""
        if not self.has_exclusions:
            return None
        widths = np.ones(len(chosen), dtype=np.int64) if widths is None else widths
        rows = []
        for (s, z), w in zip(chosen, widths):
            scan = self.scans[s]
            if scan.exclude is None:
                rows.append(np.zeros(scan.brain_mask.shape[1:], dtype=bool))
            else:
                rows.append(scan.exclude[thick_rows(z, w, len(scan.exclude))].any(axis=0))
        return torch.from_numpy(np.stack(rows)[:, None])

    def batch(self, step: int, rank: int, batch_size: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.draw(step, rank, batch_size, stream)
        return self.gather(chosen, self.widths(step, rank, batch_size, stream))

    def training_batch(self, step: int, rank: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The step's slices, brain masks and excluded voxels (None: nothing excluded)."""
        chosen, widths = self.draw(step, rank, batch_size), self.widths(step, rank, batch_size)
        return (*self.gather(chosen, widths), self.excluded(chosen, widths))


def validation_slices(scans: Sequence[ModelSpaceScan], count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A fixed set of up to ``count`` brain-holding slices spread evenly over the validation
    scans: slices, brain masks and excluded voxels (None: nothing excluded)."""
    sampler = SliceSampler(scans, seed=0)
    count = min(count, len(sampler))
    chosen = sampler.index[np.linspace(0, len(sampler) - 1, count).round().astype(int)]
    return (*sampler.gather(chosen), sampler.excluded(chosen))


class VolumeSampler:
    """Batches of whole training volumes for volumetric kinds, drawn uniformly with replacement.

    Each volume is (1, X, Y, ``depth``): the scan's axial slices centred in a block of ``depth``
    slices (the model's own block, ``models.vae3d.centre_along_depth``), so volumes of brains
    of different heights stack into one batch. As for slices, ``batch(step, rank)`` depends only
    on the seed, the step and the rank.
    """

    def __init__(self, scans: Sequence[ModelSpaceScan], seed: int, depth: int):
        if not scans:
            raise TrainingDataError("no training scans")
        self.scans = list(scans)
        self.seed = int(seed)
        self.depth = int(depth)

    def __len__(self) -> int:
        return len(self.scans)

    def draw(self, step: int, rank: int, batch_size: int, stream: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, step, rank])
        return rng.integers(0, len(self.scans), size=batch_size)

    def gather(self, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, depth) float32 volumes and bool brain masks."""
        images, masks = [], []
        for number in chosen:
            scan = self.scans[int(number)]
            # Stored as (Z, X, Y) slices; the model takes (X, Y, Z).
            image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(scan.image, 0, -1)))
            mask = torch.from_numpy(np.ascontiguousarray(np.moveaxis(scan.brain_mask, 0, -1)))
            images.append(centre_along_depth(image, self.depth)[0])
            masks.append(centre_along_depth(mask, self.depth)[0])
        return torch.stack(images)[:, None], torch.stack(masks)[:, None]

    def batch(self, step: int, rank: int, batch_size: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(self.draw(step, rank, batch_size, stream))


def validation_volumes(scans: Sequence[ModelSpaceScan], count: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` validation volumes spread evenly over the validation scans, as (B, 1, X, Y, depth)."""
    count = min(count, len(scans))
    chosen = np.unique(np.linspace(0, len(scans) - 1, count).round().astype(int))
    return VolumeSampler(scans, seed=0, depth=depth).gather(chosen)
