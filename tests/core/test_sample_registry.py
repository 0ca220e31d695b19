"""The sample registry: real public files, hash-checked, available offline from a local folder."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
import pytest
from napari.components import ViewerModel

from napari_brain_uad.downloads import file_sha256
from napari_brain_uad.sample_registry import SampleDataUnavailable, fetch, registry


def test_registry_names_a_pinned_public_source_and_licence_for_every_file():
    reg = registry()
    assert set(reg["samples"]) >= {"ixi-healthy-t1", "mslub-patient26", "brats-glioma"}
    for local, entry in reg["files"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), local
        # a raw file at a fixed 40-hex commit, never a branch name
        assert re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/", entry["url"]), local
        dataset = reg["datasets"][entry["dataset"]]
        assert dataset["licence"] and dataset["attribution"]
    for sample in reg["samples"].values():
        assert all(layer["file"] in reg["files"] for layer in sample["layers"])


def test_every_registry_file_is_verified_from_the_local_folder(shared_data, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr("pooch.retrieve", no_network)
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    for local in registry()["files"]:
        path = fetch(local, progressbar=False)
        assert path == shared_data / local


def test_a_file_missing_everywhere_gives_a_message_saying_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
    with pytest.raises(SampleDataUnavailable) as caught:
        fetch("mslub/patient26/T1.nii.gz", progressbar=False)
    message = str(caught.value)
    assert "mslub/patient26/T1.nii.gz is unavailable" in message
    assert str(tmp_path / "empty") in message and "not in the cache" in message
    assert "downloads are off" in message and "NAPARI_BRAIN_UAD_DATA" in message


def test_a_local_file_with_other_content_is_not_used(tmp_path, monkeypatch):
    fake = tmp_path / "mslub/patient26/T1.nii.gz"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the registered scan")
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path))
    with pytest.raises(SampleDataUnavailable, match="content differs"):
        fetch("mslub/patient26/T1.nii.gz", progressbar=False)


@pytest.fixture
def loopback_server(shared_data):
    """An HTTP server on 127.0.0.1 serving the shared data folder, standing in for the internet."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _point_registry_at(monkeypatch, base_url, local, remote=None, **changes):
    entries = {key: dict(value) for key, value in registry()["files"].items()}
    entries[local].update(url=f"{base_url}/{remote or local}", **changes)
    monkeypatch.setitem(registry(), "files", entries)


def test_download_is_hash_checked_and_cached(loopback_server, tmp_path, monkeypatch):
    local = "brats2013/pat0001/tumourmask.nii.gz"
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(cache))
    _point_registry_at(monkeypatch, loopback_server, local)
    path = fetch(local, progressbar=False)
    assert path == cache / local and file_sha256(path) == registry()["files"][local]["sha256"]
    # second time: from the cache, even offline
    monkeypatch.setenv("NAPARI_BRAIN_UAD_OFFLINE", "1")
    assert fetch(local, progressbar=False) == path


def test_download_with_wrong_hash_is_refused_and_not_kept(loopback_server, tmp_path, monkeypatch):
    local = "brats2013/pat0001/tumourmask.nii.gz"
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(tmp_path / "cache"))
    _point_registry_at(monkeypatch, loopback_server, local, remote="brats2013/pat0001/brainmask.nii.gz")
    with pytest.raises(SampleDataUnavailable, match="SHA256|hash"):
        fetch(local, progressbar=False)
    assert not (tmp_path / "cache" / local).exists()


def test_derived_brain_mask_is_checked_by_its_voxels(loopback_server, shared_data, tmp_path, monkeypatch):
    """The IXI brain mask is derived from a label map: the download is pinned by the mask it yields."""
    local = "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz"
    # A label map standing in for DLMUSE's: several labels, the same brain once > 0.
    mask = nib.load(shared_data / local)
    labels = np.asarray(mask.dataobj).astype(np.int16) * np.random.default_rng(0).integers(1, 200, mask.shape)
    served = tmp_path / "served"
    served.mkdir()
    nib.save(nib.Nifti1Image(labels.astype(np.int16), mask.affine), served / "labels.nii.gz")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
        monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
        monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(tmp_path / "cache"))
        _point_registry_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", local, remote="labels.nii.gz")
        path = fetch(local, progressbar=False)
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj) > 0, np.asarray(mask.dataobj) > 0)
        # a label map giving another mask is refused
        labels[tuple(np.argwhere(labels > 0)[0])] = 0  # one brain voxel fewer
        nib.save(nib.Nifti1Image(labels.astype(np.int16), mask.affine), served / "labels.nii.gz")
        path.unlink()
        with pytest.raises(SampleDataUnavailable, match="does not give the registered brain mask"):
            fetch(local, progressbar=False)
        assert not path.exists()
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("sample", "kinds"),
    [
        ("ixi-healthy-t1", ["image", "labels"]),
        ("mslub-patient26", ["image", "image", "image", "labels"]),
        ("brats-glioma", ["image", "image", "labels"]),
    ],
)
def test_napari_open_sample_gives_aligned_layers(shared_data, sample, kinds):
    viewer = ViewerModel()
    viewer.open_sample("napari-brain-uad", sample)
    assert [layer._type_string for layer in viewer.layers] == kinds
    scan = viewer.layers[0]
    for layer in viewer.layers:
        assert layer.data.shape == scan.data.shape
        np.testing.assert_allclose(layer.scale, scan.scale)
        np.testing.assert_allclose(layer.translate, scan.translate)
        assert layer.metadata["sample"]["licence"]
    assert isinstance(viewer.layers[-1], napari.layers.Labels) and viewer.layers[-1].data.max() >= 1


def test_command_line_prints_the_sample_files(shared_data):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from napari_brain_uad.sample_registry import main; sys.exit(main())",
         "mslub-patient26"],
        capture_output=True, text=True, check=True,
    )
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == ["T1.nii.gz", "T2.nii.gz", "FLAIR.nii.gz", "lesionmask.nii.gz"]
    assert all(p.is_file() for p in paths)


def _sample_command(*args: str) -> int:
    from napari_brain_uad.sample_registry import main

    return main(list(args))


def test_every_file_gathered_into_a_folder_serves_an_offline_machine(shared_data, tmp_path, monkeypatch, capsys):
    """``brain-uad-sample --all --into DIR``, then ``NAPARI_BRAIN_UAD_DATA=DIR`` with no cache."""
    folder = tmp_path / "brain-uad-data"
    assert _sample_command("--all", "--into", str(folder)) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [folder / local for local in registry()["files"]]

    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(folder))
    monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(tmp_path / "empty cache"))
    for local in registry()["files"]:
        assert fetch(local, progressbar=False) == folder / local


def test_files_missing_locally_are_downloaded_straight_into_the_folder(loopback_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_BRAIN_UAD_CACHE", str(cache))
    files = [layer["file"] for layer in registry()["samples"]["brats-glioma"]["layers"]]
    for local in files:
        _point_registry_at(monkeypatch, loopback_server, local)
    folder = tmp_path / "brain-uad-data"
    assert _sample_command("brats-glioma", "--into", str(folder)) == 0
    for local in files:
        assert file_sha256(folder / local) == registry()["files"][local]["sha256"]
    assert not cache.exists()  # not a second copy in the cache
    assert "NAPARI_BRAIN_UAD_DATA=" in capsys.readouterr().err


def test_a_file_already_in_the_folder_is_kept_and_one_with_other_content_never_overwritten(
    shared_data, tmp_path, capsys
):
    folder = tmp_path / "brain-uad-data"
    assert _sample_command("mslub-patient26", "--into", str(folder)) == 0
    kept = folder / "mslub/patient26/T2.nii.gz"
    kept_state = kept.stat().st_mtime_ns, kept.stat().st_ino
    users = folder / "mslub/patient26/T1.nii.gz"
    users.write_bytes(b"the user's own T1")
    capsys.readouterr()

    assert _sample_command("mslub-patient26", "--into", str(folder)) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no paths, so `napari $(brain-uad-sample ...)` opens nothing half-done
    assert f"{users} exists with other content" in err and "left as it is" in err
    assert users.read_bytes() == b"the user's own T1"
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == kept_state
    assert sorted(path.name for path in users.parent.iterdir()) == [
        "FLAIR.nii.gz", "T1.nii.gz", "T2.nii.gz", "lesionmask.nii.gz"]  # nothing half-copied beside them


def test_the_folder_is_left_without_a_partial_file_when_a_sample_is_unavailable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NAPARI_BRAIN_UAD_DATA", str(tmp_path / "empty"))
    folder = tmp_path / "brain-uad-data"
    assert _sample_command("brats-glioma", "--into", str(folder)) == 1
    assert "downloads are off" in capsys.readouterr().err
    assert not folder.exists() or not any(path.is_file() for path in folder.rglob("*"))


@pytest.mark.parametrize(
    "arguments", [["brats-glioma", "--all"], ["--into", "somewhere"], ["--all", "--first"]]
)
def test_the_command_refuses_arguments_that_do_not_go_together(arguments):
    with pytest.raises(SystemExit) as stopped:
        _sample_command(*arguments)
    assert stopped.value.code == 2
