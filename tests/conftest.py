"""Shared fixtures: the real scans in ../shared/data, and no network in any test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))

# The four stored geometries the plugin must handle exactly: scan and its brain mask.
GEOMETRIES = {
    "ixi-psr-2mm": ("ixi_t1/IXI661-HH-2788_T1.nii.gz", "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz"),
    "mslub-las-mni": ("mslub/patient26/T1.nii.gz", None),
    "brats-lps": ("brats2013/pat0001/FLAIR.nii.gz", "brats2013/pat0001/brainmask.nii.gz"),
    "ixi002-t2-anisotropic-oblique": ("ixi002/T2.nii.gz", "ixi002/T2_brainmask.nii.gz"),
}


@pytest.fixture(autouse=True)
def _offline_samples(monkeypatch, tmp_path_factory):
    """Samples come from the shared data folder; a test never downloads."""
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(SHARED_DATA))
    monkeypatch.setenv("NAPARI_BRAIN_UAD_OFFLINE", "1")
    monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def flair_model(monkeypatch) -> str:
    """A registry whose FLAIR model is ``flair-test``: the bundled DAE without bias correction
    under another name (no FLAIR model is bundled yet); T1 keeps its model, the default."""
    from napari_brain_uad import model_registry

    registry = model_registry.registry()
    monkeypatch.setitem(registry["models"], "flair-test", registry["models"]["ixi-t1-dae"])
    monkeypatch.setitem(registry, "default_by_contrast", {**registry["default_by_contrast"], "FLAIR": "flair-test"})
    return "flair-test"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real scans not found at {SHARED_DATA} (set NAPARI_BRAIN_UAD_DATA to ../shared/data)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _discover_plugins():
    """napari discovers plugins when a Viewer or the napari command starts; a bare
    ViewerModel (as in these tests) needs the same discovery first."""
    from npe2 import PluginManager

    PluginManager.instance().discover()


# Two healthy IXI subjects whose slices the model tests train on.
IXI_TRAINING_SUBJECTS = ("IXI012-HH-1211", "IXI013-HH-1212")


@pytest.fixture(scope="session")
def ixi_training_slices():
    """Real healthy training slices: (slices, brain_masks), each (16, 1, 96, 96), slices float32
    in [0, 1] in model space, masks bool; the 8 most brain-filled axial slices of two subjects."""
    import numpy as np
    import torch

    from napari_brain_uad.nifti import read_nifti
    from napari_brain_uad.preprocess import to_model_space

    folder = SHARED_DATA / "ixi_t1"
    images, masks = [], []
    for subject in IXI_TRAINING_SUBJECTS:
        scan_path, mask_path = folder / f"{subject}_T1.nii.gz", folder / "brainmask" / f"{subject}_brainmask.nii.gz"
        if not (scan_path.is_file() and mask_path.is_file()):
            pytest.skip(f"healthy IXI scans not found in {folder}")
        volume = to_model_space(read_nifti(scan_path), brain_mask=read_nifti(mask_path).data > 0)
        brain_per_slice = volume.brain_mask.sum(axis=(0, 1))
        chosen = np.sort(np.argsort(brain_per_slice)[-8:])
        images.append(np.moveaxis(volume.image[:, :, chosen], 2, 0))
        masks.append(np.moveaxis(volume.brain_mask[:, :, chosen], 2, 0))
    slices = torch.from_numpy(np.concatenate(images)[:, None].astype(np.float32))
    brain = torch.from_numpy(np.concatenate(masks)[:, None].astype(bool))
    return slices, brain


# ---------------------------------------------------------------- models trained a few steps


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch thread for a module's tests, restored afterwards: on a shared two-core machine
    torch's two intra-op threads contend with other processes (a training step took 6 s with
    two threads, 0.1 s with one). Model test modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _half_spec():
    from napari_brain_uad.preprocess import ModelSpaceSpec

    return ModelSpaceSpec(in_plane=(48, 48))


HALF_SPEC = _half_spec()  # the model space of half_resolution's slices
# A MONAI U-Net (the autoencoders' and DAE's network) small enough to train for a few steps.
SMALL_UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm_num_groups": 4}


def _no_config_class():
    import dataclasses

    from napari_brain_uad.models.base import ModelConfig

    @dataclasses.dataclass(frozen=True)
    class NoConfig(ModelConfig):
        """The configuration of a test's own model kind, which has nothing to configure."""

    return NoConfig


NoConfig = _no_config_class()


def box_mask(shape=(32, 32, 8), margin=4):
    """A box inside the volume, ``margin`` voxels in from each side in-plane, every slice."""
    import numpy as np

    mask = np.zeros(shape, dtype=bool)
    mask[margin:-margin, margin:-margin, :] = True
    return mask


def half_resolution(slices, brain):
    """Slices and brain masks at half resolution (48² from 96²), for fast training tests."""
    from torch.nn import functional

    return functional.avg_pool2d(slices, 2), functional.max_pool2d(brain.float(), 2) > 0


def seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def train_and_evaluate(model, slices, brain, steps: int) -> tuple[float, float]:
    """Loss on a fixed draw (seeded timesteps, patches, masks and noise) before and after a few
    seeded Adam steps."""

    def evaluation_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.training_loss(slices, brain, generator=seeded(1234)).item()

    import torch

    from napari_brain_uad.models.base import random_integers

    before = evaluation_loss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = seeded(0)
    model.train()
    for step in range(steps):
        batch = random_integers(0, slices.shape[0], (8,), generator, "cpu")
        loss = model.training_loss(slices[batch], brain[batch], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return before, evaluation_loss()


def best_constant_loss(slices) -> float:
    """L1 of the best constant prediction (the median): what a net ignoring its input reaches."""
    return (slices - slices.median()).abs().mean().item()


# A cDDPM small enough to train for a few steps in a test. Tests that pre-train only its encoder
# still build the whole model first: the encoder's initial weights depend on it.
def _small_cddpm_config():
    from napari_brain_uad.models import CDDPMConfig

    return CDDPMConfig(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16, context_dim=32,
                       encoder_layers=(1, 1, 1, 1), encoder_channels=(8, 16, 16, 32))


SMALL_CDDPM = _small_cddpm_config()


# ---------------------------------------------------------------- healthy scans as training takes them

# Three healthy IXI subjects (training scanner) for the tests that train or list scans.
IXI_THREE = ("IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236")


@pytest.fixture(scope="session")
def small_ddpm_checkpoint(tmp_path_factory):
    """A small DDPM checkpoint with a stored healthy-99 threshold: random weights whose output
    depends on the input (MONAI zero-initialises the output layer), for tests of the doors
    rather than of a model's quality."""
    import torch

    from napari_brain_uad.models import DDPM, DDPMConfig, save_model

    torch.manual_seed(0)
    model = DDPM(DDPMConfig(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=16))
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    return save_model(path, model, {"thresholds": {"healthy-99": {"value": 0.05}},
                                    "training_data": {"description": "test weights"}})


@pytest.fixture(scope="session")
def ixi_folder(tmp_path_factory):
    """Three healthy IXI subjects as a folder of scans plus a folder of brain masks (links)."""
    ixi = SHARED_DATA / "ixi_t1"
    if not ixi.is_dir():
        pytest.skip(f"healthy IXI scans not found in {ixi}")
    root = tmp_path_factory.mktemp("ixi")
    (root / "scans").mkdir()
    (root / "masks").mkdir()
    for subject in IXI_THREE:
        (root / "scans" / f"{subject}_T1.nii.gz").symlink_to(ixi / f"{subject}_T1.nii.gz")
        (root / "masks" / f"{subject}_brainmask.nii.gz").symlink_to(ixi / "brainmask" / f"{subject}_brainmask.nii.gz")
    return root


@pytest.fixture(scope="session")
def ixi_scans(ixi_folder):
    """The three subjects in model space: two for training, one for validation."""
    from brain_uad_training.data import find_scans, load_model_space
    from napari_brain_uad.preprocess import ModelSpaceSpec

    loaded = load_model_space(find_scans(ixi_folder / "scans", ixi_folder / "masks"), ModelSpaceSpec())
    return loaded[:2], loaded[2:]


@pytest.fixture
def ixi_worklist_csv(shared_data, tmp_path):
    """A CSV list of the three subjects' scans (skull on) with their brain masks, as a user keeps
    one; the files are copies, so a test may change or break one."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    lines = ["id,scan,brain_mask"]
    for subject in IXI_THREE:
        shutil.copy(shared_data / "ixi_t1" / f"{subject}_T1.nii.gz", data / f"{subject}.nii.gz")
        shutil.copy(shared_data / "ixi_t1" / "brainmask" / f"{subject}_brainmask.nii.gz", data / f"{subject}_brain.nii.gz")
        lines.append(f"{subject},data/{subject}.nii.gz,data/{subject}_brain.nii.gz")
    listing = tmp_path / "worklist.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing
