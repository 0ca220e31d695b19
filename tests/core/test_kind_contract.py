"""What every registered model kind promises the rest of the plugin, checked on each of them.

A kind is loaded from a checkpoint, reconstructs a model-space volume through ``reconstruct``
(the step every door runs), hands over the maps it declares in ``extra_maps``, and is scored by
its default scorer. These tests run over ``MODEL_KINDS`` as registered, so a new kind is held
to the same contract without a line here beyond its tiny settings (a test asks for them).
Networks are tiny and inputs small (48² slices, four of them): seconds per kind on a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_brain_uad.model_card import default_scorer
from napari_brain_uad.models import MODEL_KINDS, build_model, load_model, save_model
from napari_brain_uad.preprocess import ModelSpaceSpec
from napari_brain_uad.reconstruct import reconstruct_volume_with_maps
from napari_brain_uad.scoring import SCORERS, score

SPEC = ModelSpaceSpec(in_plane=(48, 48))
DEPTH = 4  # axial slices of the test volume

_DIFFUSION = {"channels": [8, 16, 16], "norm_num_groups": 8, "num_head_channels": 8}
_AUTOENCODER = {"channels": [8, 16, 16, 32], "latent_size": 16}
# Each kind's smallest sensible network; every registered kind needs an entry (a test checks).
TINY = {
    "ddpm": _DIFFUSION,
    "pddpm": {**_DIFFUSION, "patch_size": 24},
    "cddpm": {**_DIFFUSION, "context_dim": 16},
    # Half the paper's patch, stride and grid, as the slices are half its size.
    "maediff": {**_DIFFUSION, "patch_size": 24, "patch_stride": 8, "grid_size": 8, "mae_encoder_width": 16, "mae_encoder_heads": 2, "mae_decoder_width": 16,
                "mae_decoder_heads": 2},
    "ae": _AUTOENCODER,
    "vae": _AUTOENCODER,
    "dae": {"channels": [8, 16, 16, 32], "num_res_units": 1},
    "vae3d": {"channels": [4, 8, 8, 8], "latent_size": 16},
    "sadm": {"channels": [8, 16, 32], "norm_num_groups": 4, "base_kind": "dae",
             "base_hyperparameters": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
                                      "norm_num_groups": 4}},
    "phanes": {"channels": [8, 16, 32], "strides": [2, 2, 2], "latent_size": 16, "generator_channels": [8, 16, 32],
               "aot_blocks": 1, "discriminator_channels": [8, 16, 16, 16]},
}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_model(kind: str):
    """A tiny model of ``kind`` with its weights moved off their initialisation (zero-initialised
    layers included), so a fresh model could not pass a round trip by chance."""
    torch.manual_seed(0)
    model = build_model(kind, TINY[kind], SPEC)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_every_registered_kind_has_tiny_settings_here():
    assert set(TINY) >= set(MODEL_KINDS)


def tiny_volume() -> tuple[np.ndarray, np.ndarray]:
    """A smooth model-space volume (X, Y, Z) in [0, 1] with a bright spot, and its brain mask."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (*SPEC.in_plane, DEPTH)), indexing="ij")
    brain = x**2 + y**2 < 0.8
    image = np.where(brain, 0.5 + 0.2 * np.cos(3 * x) * np.sin(2 * y) + 0.05 * z, 0.0)
    image[(x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.02] = 0.95
    return image.astype(np.float32), brain


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_saved_kind_loads_as_the_same_model(kind, tmp_path):
    model = tiny_model(kind)
    path = save_model(tmp_path / f"{kind}.safetensors", model)
    loaded, metadata = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.spec == model.spec
    assert metadata["kind"] == kind == loaded.kind
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, value in state.items():  # exactly; NaN marks a value not yet measured (PHANES)
        torch.testing.assert_close(loaded_state[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    image, _ = tiny_volume()
    first, first_maps = reconstruct_volume_with_maps(model, image, device="cpu", seed=3)
    second, second_maps = reconstruct_volume_with_maps(loaded, image, device="cpu", seed=3)
    np.testing.assert_array_equal(first, second)
    assert first_maps.keys() == second_maps.keys() == set(model.extra_maps)
    for name in first_maps:
        np.testing.assert_array_equal(first_maps[name], second_maps[name])


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_kind_gives_its_maps_and_its_default_scorer_scores_them(kind):
    model = tiny_model(kind)
    name = default_scorer({"kind": kind})
    assert name in SCORERS, f"{kind}'s default scorer {name!r} is not registered"
    scorer = SCORERS[name]
    assert scorer.usable_with(model.extra_maps), f"{name} needs maps {scorer.needs_maps}; {kind} makes {model.extra_maps}"

    image, brain = tiny_volume()
    samples = scorer.default_samples
    reconstructions, maps = reconstruct_volume_with_maps(model, image, samples=samples, device="cpu", seed=0)
    assert reconstructions.shape == (samples, *image.shape)
    assert set(maps) == set(model.extra_maps)
    for values in maps.values():
        assert values.shape == (samples, *image.shape) and np.all(np.isfinite(values))

    other = reconstructions if scorer.needs_samples else reconstructions[0]
    model_maps = {map_name: values.mean(axis=0) for map_name, values in maps.items()}
    score_map = np.asarray(score(name, image, other, brain, maps=model_maps))
    assert score_map.shape == image.shape and np.all(np.isfinite(score_map))
    assert np.any(score_map[brain] != 0)
