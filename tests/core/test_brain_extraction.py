"""Brain extraction: deepbet's published networks loaded as plain tensors, on real raw scans."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from napari_brain_uad.brain_extraction import (
    WEIGHTS,
    BrainExtractionUnavailable,
    extract_brain,
    networks,
    weights_file,
)
from napari_brain_uad.brain_extraction.archive import ArchiveError, read_state_dict
from napari_brain_uad.brain_extraction.network import LinkNet3d
from napari_brain_uad.nifti import read_nifti


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_the_shipped_weights_fit_our_network_exactly(name):
    state = read_state_dict(weights_file(name))
    expected = LinkNet3d().state_dict()
    assert set(state) == set(expected)
    assert all(state[key].shape == expected[key].shape for key in expected)


def test_the_archive_reader_runs_nothing_from_the_file(tmp_path):
    """A pickle that names anything but modules and tensors (here: a shell command) is refused
    before anything is called."""

    class Payload:
        def __reduce__(self):
            import os

            return os.system, ("touch " + str(tmp_path / "ran"),)

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("evil/data.pkl", pickle.dumps(Payload()))
    with pytest.raises(ArchiveError, match="posix.system|os.system|nt.system"):
        read_state_dict(archive)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ArchiveError, match="not a TorchScript archive"):
        read_state_dict(_zip_without_pickle(tmp_path))


def _zip_without_pickle(tmp_path):
    path = tmp_path / "empty.pt"
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("model/readme.txt", "no weights here")
    return path


def test_weights_that_are_not_the_published_ones_are_refused(monkeypatch, tmp_path):
    from importlib import metadata

    fake_site = tmp_path / "site"
    (fake_site / "data/models").mkdir(parents=True)
    for name in WEIGHTS:
        shutil.copy(weights_file(name), fake_site / "data/models" / name)
    with open(fake_site / "data/models/model.pt", "ab") as handle:
        handle.write(b"tampered")

    class FakeDistribution:
        def locate_file(self, relative):
            return fake_site / relative

    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution())
    with pytest.raises(BrainExtractionUnavailable, match="SHA256 differs"):
        weights_file("model.pt")


@pytest.fixture(scope="module")
def ixi_subjects(shared_data):
    subjects = ("IXI049-HH-1358", "IXI105-HH-1471")
    return [(read_nifti(shared_data / f"ixi_t1/{s}_T1.nii.gz"),
             read_nifti(shared_data / f"ixi_t1/brainmask/{s}_brainmask.nii.gz").data > 0) for s in subjects]


def test_extraction_matches_the_ixi_brain_masks(ixi_subjects):
    for scan, reference in ixi_subjects:
        mask = extract_brain(scan.data, scan.geometry.affine)
        assert mask.shape == scan.data.shape and mask.dtype == bool
        assert dice(mask, reference) > 0.97  # measured: 0.98 on every subject tried


def test_extraction_is_deepbets_own(ixi_subjects):
    """Our safe loading and pipeline give deepbet's own result (its TorchScript loader, which a
    test may run): the same voxels but for a handful at the edge."""
    from deepbet import BrainExtraction
    import nibabel as nib

    scan, _ = ixi_subjects[0]
    ours = extract_brain(scan.data, scan.geometry.affine)
    _, theirs, _ = BrainExtraction(no_gpu=True).run(nib.Nifti1Image(scan.data.astype(np.float32),
                                                                    scan.geometry.affine))
    theirs = np.asarray(theirs.dataobj) > 0
    assert np.count_nonzero(ours != theirs) <= 1e-4 * ours.size


def test_extraction_follows_the_scan_in_any_orientation(ixi_subjects):
    """The same head stored flipped and with its axes swapped gives the same brain, stored the
    same way as the scan."""
    scan, _ = ixi_subjects[1]
    mask = extract_brain(scan.data, scan.geometry.affine)
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, scan.data.shape[2] - 1], [0, 0, 0, 1]], float)
    data = np.flip(np.swapaxes(scan.data, 0, 1), axis=2)
    moved = extract_brain(data, scan.geometry.affine @ swap)
    assert dice(np.flip(np.swapaxes(mask, 0, 1), axis=2), moved) > 0.995


def test_a_blank_volume_gives_no_brain():
    assert not extract_brain(np.full((64, 64, 64), 7.0, np.float32), np.eye(4)).any()


def test_networks_are_loaded_once_per_device():
    assert networks("cpu") is networks("cpu")
    coarse, _ = networks("cpu")
    assert not coarse.training and next(coarse.parameters()).dtype == torch.float32


def test_progress_moves_layer_by_layer_and_a_cancel_stops_within_a_layer(ixi_subjects):
    from napari_brain_uad.errors import Cancelled

    scan = ixi_subjects[0][0]
    fractions = []
    with pytest.raises(Cancelled):
        # Cancelled once the fine pass has begun: it stops there, long before the pass ends.
        extract_brain(scan.data, scan.geometry.affine, progress=fractions.append,
                      cancelled=lambda: bool(fractions) and fractions[-1] > 0.2)
    assert fractions == sorted(fractions) and len(fractions) > 20
    assert 0.2 < fractions[-1] < 0.3  # stopped at the first layer past 0.2, not at the end of a pass
    # Without a cancel, the progress reaches the end of the fine pass, then 1; the hooks are removed after.
    done = []
    extract_brain(scan.data, scan.geometry.affine, progress=done.append)
    assert done[-2:] == [pytest.approx(0.95), 1.0]
    coarse, fine = networks("cpu")
    assert not any(module._forward_pre_hooks for network in (coarse, fine) for module in network.modules())
