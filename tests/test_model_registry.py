"""Models by name: the bundled default is there and intact, downloads are hash-checked and cached,
and anything unusable is refused with a message naming it."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from napari_brain_uad import downloads, model_registry
from napari_brain_uad.checkpoint import read_metadata
from napari_brain_uad.model_card import card as model_card
from napari_brain_uad.downloads import file_sha256
from napari_brain_uad.model_registry import (
    ModelUnavailable,
    default_model_name,
    resolve_model,
)
from napari_brain_uad.models import DDPM, DDPMConfig, load_model, save_model
from napari_brain_uad.thresholds import default_threshold


def test_the_default_model_is_bundled_intact_and_loads():
    path = resolve_model()
    assert path == resolve_model(default_model_name())
    assert path.stat().st_size < 25 * 2**20  # the package stays small
    model, metadata = load_model(path)
    assert metadata["model_space"]["modality"] == "T1"
    assert metadata["training_data"]["licence"].startswith("CC BY-SA 3.0")
    card = model_card(path)
    # The card says how it was made, what it is for and how well it does.
    assert card["training_command"] and card["limits"] and card["results"]
    assert card["default_scorer"] and default_threshold(metadata, card["default_scorer"])
    assert not any(str(value).startswith("/") for value in metadata["training"]["settings"].values())


def test_a_damaged_bundled_file_is_reported(monkeypatch):
    entries = model_registry.registry()["models"]
    name = default_model_name()
    damaged = {**entries[name], "sha256": "0" * 64}
    monkeypatch.setitem(model_registry.registry()["models"], name, damaged)
    with pytest.raises(ModelUnavailable, match="damaged"):
        resolve_model(name)


def test_paths_and_unknown_names(tmp_path):
    with pytest.raises(ModelUnavailable, match=f"not a model name.*{default_model_name()}"):
        resolve_model("no-such-model")
    with pytest.raises(ModelUnavailable, match="not a file"):
        resolve_model(tmp_path)
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"x")
    assert resolve_model(str(own)) == own  # a user's file is taken as given; loading checks it


@pytest.fixture
def served_checkpoint(tmp_path):
    """A checkpoint on a local HTTP server (a real pooch download), and its hash."""
    torch.manual_seed(0)
    folder = tmp_path / "server"
    folder.mkdir()
    path = save_model(folder / "remote.safetensors", DDPM(DDPMConfig(channels=(8, 8, 8), norm_num_groups=4,
                                                                     num_head_channels=8)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/remote.safetensors", file_sha256(path)
    server.shutdown()


def test_a_registry_model_is_downloaded_hash_checked_and_cached(served_checkpoint, monkeypatch):
    url, sha256 = served_checkpoint
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    monkeypatch.setitem(model_registry.registry()["models"], "remote-test",
                        {"url": url, "sha256": sha256, "filename": "remote-test.safetensors"})
    path = resolve_model("remote-test")
    assert file_sha256(path) == sha256 and read_metadata(path)["kind"] == "ddpm"
    monkeypatch.setenv("NAPARI_BRAIN_UAD_OFFLINE", "1")
    assert resolve_model("remote-test") == path  # from the cache, no network


def test_a_download_with_the_wrong_hash_is_refused_and_not_kept(served_checkpoint, monkeypatch):
    url, _ = served_checkpoint
    monkeypatch.delenv("NAPARI_BRAIN_UAD_OFFLINE")
    monkeypatch.setitem(model_registry.registry()["models"], "tampered",
                        {"url": url, "sha256": "1" * 64, "filename": "tampered.safetensors"})
    with pytest.raises(ModelUnavailable, match="download .* failed"):
        resolve_model("tampered")
    assert not (downloads.cache_dir() / "models" / "tampered.safetensors").exists()


def test_offline_without_a_cached_copy_says_so(monkeypatch):
    monkeypatch.setitem(model_registry.registry()["models"], "remote-only",
                        {"url": "http://127.0.0.1:9/x.safetensors", "sha256": "2" * 64, "filename": "x.safetensors"})
    with pytest.raises(ModelUnavailable, match="downloads are off"):
        resolve_model("remote-only")
