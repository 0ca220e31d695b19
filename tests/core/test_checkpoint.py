"""The checkpoint container: safetensors + JSON metadata, never unpickled, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from napari_brain_uad.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)

METADATA = {
    "kind": "ddpm",
    "hyperparameters": {"channels": [32, 64, 64]},
    "model_space": {"spacing_mm": 2.0, "in_plane": [96, 96], "percentiles": [1.0, 99.0]},
    "thresholds": {"healthy-p99": 0.31},
}


@pytest.fixture
def weights():
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3))
    return network.state_dict()


def test_round_trip(tmp_path, weights):
    path = save_checkpoint(tmp_path / "model.safetensors", weights, METADATA)
    state, metadata = load_checkpoint(path)
    assert metadata == {**METADATA, "format_version": FORMAT_VERSION}
    assert read_metadata(path) == metadata
    assert state.keys() == weights.keys()
    for name in weights:
        assert torch.equal(state[name], weights[name])
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_never_overwrites_silently(tmp_path, weights):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"someone's file")
    with pytest.raises(FileExistsError):
        save_checkpoint(path, weights, METADATA)
    assert path.read_bytes() == b"someone's file"


def test_truncated_file(tmp_path, weights):
    path = save_checkpoint(tmp_path / "model.safetensors", weights, METADATA)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: .*truncated"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path, weights):
    path = tmp_path / "future.safetensors"
    header = json.dumps({**METADATA, "format_version": FORMAT_VERSION + 1})
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"napari_brain_uad": header})
    with pytest.raises(CheckpointError, match="newer than this napari-brain-uad reads"):
        load_checkpoint(path)


def test_foreign_safetensors_is_refused(tmp_path, weights):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    with pytest.raises(CheckpointError, match="not one of our checkpoints"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.safetensors"  # disguised by its name
    torch.save({"weights": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="pickle-based torch file"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_file_and_bad_metadata(tmp_path, weights):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="kind"):
        save_checkpoint(tmp_path / "x.safetensors", weights, {"hyperparameters": {}})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "y.safetensors", weights, {"kind": "ddpm", "bad": object()})
    assert not list(tmp_path.iterdir())


def test_a_card_declaring_a_network_its_weights_do_not_hold_is_refused_before_building_it(tmp_path):
    """A bundled model's file with its card edited to huge channel counts, or to 0.01 mm voxels,
    tried to allocate 104 GB to 37 TiB before the weights were checked."""
    import resource

    from safetensors import safe_open

    from napari_brain_uad.checkpoint import CheckpointError
    from napari_brain_uad.model_registry import resolve_model
    from napari_brain_uad.models import load_model

    source = resolve_model("ixi-t1-dae-n4")
    with safe_open(str(source), framework="pt") as handle:
        card = json.loads(handle.metadata()["napari_brain_uad"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, change in (("huge", {"hyperparameters": {**card["hyperparameters"], "channels": [4096, 8192, 16384, 32768]}}),
                         ("tiny", {"model_space": {**card["model_space"], "spacing_mm": 0.01}})):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"napari_brain_uad": json.dumps({**card, **change})})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(CheckpointError, match="do not fit|do not describe"):
            load_model(path)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: nothing huge was taken


def test_a_truncated_copy_of_a_model_is_called_truncated_not_a_pickle(tmp_path):
    from napari_brain_uad.checkpoint import CheckpointError, read_metadata
    from napari_brain_uad.model_registry import resolve_model

    data = resolve_model("ixi-t1-dae-n4").read_bytes()
    for cut in (len(data) // 2, 200):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as caught:
            from napari_brain_uad.models import load_model

            read_metadata(path)
            load_model(path)
        assert "pickle" not in str(caught.value) and ("truncated" in str(caught.value))
    header_length = int.from_bytes(data[:8], "little")
    forged = tmp_path / "first-byte-0x80.safetensors"  # a header length whose first byte is 0x80
    body = data[8:8 + header_length]
    forged.write_bytes((0x80 + 256 * (header_length // 256 + 1)).to_bytes(8, "little") + body[:100])
    with pytest.raises(CheckpointError) as caught:
        read_metadata(forged)
    assert "pickle" not in str(caught.value)
