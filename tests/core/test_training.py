"""The training module on real healthy IXI scans: every kind learns, runs are reproducible and
resumable, checkpoints load in the plugin's core, the command refuses bad input clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brain_uad_training import ConfigError, TrainingConfig, TrainingDataError, fit
from brain_uad_training.augment import AugmentationSettings, RandGhosting, SliceAugmenter
from brain_uad_training.cli import main as train_command
from brain_uad_training.data import SliceSampler, find_scans, load_model_space, split_subjects
from napari_brain_uad.checkpoint import CheckpointError, read_metadata
from napari_brain_uad.nifti import read_nifti
from napari_brain_uad.models import MODEL_KINDS, build_model, load_model, save_model
from napari_brain_uad.preprocess import ModelSpaceSpec, to_model_space
from napari_brain_uad.reconstruct import reconstruct_volume

from conftest import SHARED_DATA

SUBJECTS = ("IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236")
IXI = SHARED_DATA / "ixi_t1"

# Small networks, so that every kind trains in seconds on two CPU cores. Each kind registered
# in the core must have an entry (a test checks), so a new kind cannot go untrained here.
SMALL_MODELS = {
    "ddpm": {"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16},
    "pddpm": {"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16},
    "cddpm": {"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16},
    "ae": {"channels": [16, 32, 32, 64], "latent_size": 64},
    "vae": {"channels": [16, 32, 32, 64], "latent_size": 64},
    "dae": {"channels": [16, 32, 32, 64], "num_res_units": 1},
    "vae3d": {"channels": [4, 8, 8, 8], "latent_size": 32},
    "sadm": {"channels": [8, 16, 32], "norm_num_groups": 4},  # on a small DAE (base_for)
    "maediff": {"channels": [16, 32, 32], "norm_num_groups": 8, "num_head_channels": 16, "mae_encoder_width": 32,
                "mae_encoder_heads": 2, "mae_decoder_width": 32, "mae_decoder_heads": 2},
    # Every step of the 25-step test in stage (a), the VAE; tests/test_phanes.py trains the GAN.
    "phanes": {"channels": [16, 32, 32, 64], "latent_size": 64, "vae_steps": 1000, "generator_channels": [8, 16, 32],
               "aot_blocks": 1, "discriminator_channels": [8, 16, 32, 32]},
}


def base_for(kind: str, folder) -> dict:
    """For a kind that sits on a trained model (SADM): a small saved DAE as its base."""
    if not MODEL_KINDS[kind].needs_base_model:
        return {}
    torch.manual_seed(0)
    path = save_model(folder / "base.safetensors", build_model("dae", SMALL_MODELS["dae"]), overwrite=True)
    return {"base_model": str(path)}


def small_config(tmp_path, ixi_folder, **changes) -> TrainingConfig:
    values = dict(
        data=str(ixi_folder / "scans"),
        brain_masks=str(ixi_folder / "masks"),
        output=str(tmp_path / "run"),
        model=SMALL_MODELS["ddpm"],
        steps=6,
        batch_size=4,
        learning_rate=1e-3,
        validation_fraction=0.34,
        validation_slices=8,
        validate_every=3,
        data_description="IXI T1 (3 subjects, Hammersmith)",
        data_licence="CC BY-SA 3.0",
    )
    values.update(changes)
    return TrainingConfig(**values)


# ---------------------------------------------------------------- every kind learns


def test_every_registered_kind_has_a_small_training_config():
    assert set(SMALL_MODELS) >= set(MODEL_KINDS)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_every_kind_trains_on_real_slices_and_its_validation_loss_falls(kind, tmp_path, ixi_folder, ixi_scans):
    volumetric = MODEL_KINDS[kind].volumetric  # whole volumes: fewer per step, no slice augmentation
    config = small_config(tmp_path, ixi_folder, kind=kind, model=SMALL_MODELS[kind], steps=25,
                          batch_size=2 if volumetric else 8, validate_every=25, validation_slices=16,
                          augment=not volumetric, **base_for(kind, tmp_path))
    result = fit(config, show_progress=False, scans=ixi_scans)
    (first_step, first), (last_step, last) = result.validation_history[0], result.validation_history[-1]
    assert (first_step, last_step) == (0, 25)
    assert last < 0.9 * first, f"{kind}: validation loss {first:.4f} -> {last:.4f}"
    model, metadata = load_model(result.best)
    assert metadata["kind"] == kind and metadata["validation"]["best_step"] == 25


def test_cddpm_encoder_pre_training_runs_before_training_and_is_recorded(tmp_path, ixi_folder, ixi_scans):
    config = small_config(tmp_path, ixi_folder, kind="cddpm", model=SMALL_MODELS["cddpm"], steps=1,
                          pretrain_encoder_steps=2)
    untouched = fit(small_config(tmp_path / "plain", ixi_folder, kind="cddpm", model=SMALL_MODELS["cddpm"], steps=1),
                    show_progress=False, scans=ixi_scans)
    result = fit(config, show_progress=False, scans=ixi_scans)
    assert read_metadata(result.last)["training"]["settings"]["pretrain_encoder_steps"] == 2
    pretrained, plain = weights(result.last), weights(untouched.last)
    assert not torch.equal(pretrained["encoder.conv1.weight"], plain["encoder.conv1.weight"])
    with pytest.raises(ConfigError, match="cddpm kind only"):
        small_config(tmp_path, ixi_folder, pretrain_encoder_steps=2)


# ---------------------------------------------------------------- checkpoints the plugin reads


def test_a_training_checkpoint_loads_in_the_core_and_reconstructs_a_volume(tmp_path, ixi_folder, ixi_scans):
    result = fit(small_config(tmp_path, ixi_folder), show_progress=False, scans=ixi_scans)
    model, metadata = load_model(result.last)
    assert metadata["model_space"]["modality"] == "T1"
    assert metadata["training_data"]["licence"] == "CC BY-SA 3.0"
    assert metadata["training_data"]["training_subjects"] == ["IXI012-HH-1211_T1", "IXI013-HH-1212_T1"]
    assert metadata["training_data"]["validation_subjects"] == ["IXI014-HH-1236_T1"]
    assert metadata["training"]["steps_done"] == 6 and metadata["training"]["finished"]
    assert metadata["training"]["settings"]["learning_rate"] == 1e-3
    assert [step for step, _ in metadata["validation"]["history"]] == [0, 3, 6]

    held_out = to_model_space(read_nifti(IXI / "IXI033-HH-1259_T1.nii.gz"),
                              brain_mask=read_nifti(IXI / "brainmask/IXI033-HH-1259_brainmask.nii.gz").data > 0)
    recon = reconstruct_volume(model, held_out.image, samples=2, seed=0, device="cpu", batch_size=32)
    assert recon.shape == (2, *held_out.image.shape)
    assert np.isfinite(recon).all() and 0 <= recon.min() and recon.max() <= 1


def test_the_training_state_is_not_a_model(tmp_path, ixi_folder, ixi_scans):
    result = fit(small_config(tmp_path, ixi_folder, steps=1), show_progress=False, scans=ixi_scans)
    with pytest.raises(CheckpointError, match="unknown model kind 'training-state'"):
        load_model(result.output / "training_state.safetensors")


def test_checkpoints_are_readable_by_others_like_any_saved_file(tmp_path, ixi_folder, ixi_scans):
    result = fit(small_config(tmp_path, ixi_folder, steps=1), show_progress=False, scans=ixi_scans)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (result.last.stat().st_mode & 0o777) == (0o666 & ~umask)


# ---------------------------------------------------------------- reproducible, resumable, stoppable


def losses(output: Path) -> list[float]:
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in entries if "loss" in entry]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_fixed_seed_gives_the_same_run_and_another_seed_another(tmp_path, ixi_folder, ixi_scans):
    one = fit(small_config(tmp_path / "a", ixi_folder), show_progress=False, scans=ixi_scans)
    two = fit(small_config(tmp_path / "b", ixi_folder), show_progress=False, scans=ixi_scans)
    other = fit(small_config(tmp_path / "c", ixi_folder, seed=1), show_progress=False, scans=ixi_scans)
    assert losses(one.output) == losses(two.output)
    assert_same_weights(one.last, two.last)
    assert losses(other.output) != losses(one.output)


def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(tmp_path, ixi_folder, ixi_scans):
    whole = fit(small_config(tmp_path / "whole", ixi_folder), show_progress=False, scans=ixi_scans)
    first_half = small_config(tmp_path / "halves", ixi_folder, steps=3)
    fit(first_half, show_progress=False, scans=ixi_scans)
    resumed = fit(small_config(tmp_path / "halves", ixi_folder), resume=True, show_progress=False, scans=ixi_scans)
    assert resumed.steps_done == 6
    assert losses(resumed.output) == losses(whole.output)
    assert_same_weights(resumed.last, whole.last)
    assert resumed.validation_history == whole.validation_history


def test_ctrl_c_stops_after_the_current_step_and_leaves_whole_files(tmp_path, ixi_folder, ixi_scans):
    """A real SIGINT to this process during step 2: the step finishes, the state of step 2 is
    saved, nothing half-written stays behind, and resuming completes the run exactly."""

    def press_ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = small_config(tmp_path / "stopped", ixi_folder)
    stopped = fit(config, show_progress=False, scans=ixi_scans, on_step=press_ctrl_c)
    assert stopped.stopped_early and stopped.steps_done == 2
    assert read_metadata(stopped.last)["training"]["steps_done"] == 2
    assert not read_metadata(stopped.last)["training"]["finished"]
    assert read_metadata(stopped.output / "training_state.safetensors")["step"] == 2
    assert not [p for p in stopped.output.iterdir() if p.name.startswith(".")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back

    resumed = fit(config, resume=True, show_progress=False, scans=ixi_scans)
    whole = fit(small_config(tmp_path / "whole", ixi_folder), show_progress=False, scans=ixi_scans)
    assert_same_weights(resumed.last, whole.last)


def test_a_previous_run_is_never_overwritten_silently(tmp_path, ixi_folder, ixi_scans):
    config = small_config(tmp_path, ixi_folder, steps=1)
    fit(config, show_progress=False, scans=ixi_scans)
    before = (Path(config.output) / "last.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="holds a previous run"):
        fit(config, show_progress=False, scans=ixi_scans)
    assert (Path(config.output) / "last.safetensors").read_bytes() == before
    fit(config, overwrite=True, show_progress=False, scans=ixi_scans)


def test_resume_refuses_a_different_model_or_nothing_to_resume(tmp_path, ixi_folder, ixi_scans):
    with pytest.raises(ConfigError, match="nothing to resume"):
        fit(small_config(tmp_path, ixi_folder), resume=True, show_progress=False, scans=ixi_scans)
    fit(small_config(tmp_path, ixi_folder, steps=2), show_progress=False, scans=ixi_scans)
    changed = small_config(tmp_path, ixi_folder, learning_rate=1e-4)
    with pytest.raises(ConfigError, match="learning_rate"):
        fit(changed, resume=True, show_progress=False, scans=ixi_scans)


# ---------------------------------------------------------------- data


def test_scans_are_matched_to_their_brain_masks_by_subject(ixi_folder):
    pairs = find_scans(ixi_folder / "scans", ixi_folder / "masks")
    assert [p.image.name for p in pairs] == [f"{s}_T1.nii.gz" for s in SUBJECTS]
    assert [p.brain_mask.name for p in pairs] == [f"{s}_brainmask.nii.gz" for s in SUBJECTS]


def test_a_csv_lists_scans_relative_to_itself(tmp_path, ixi_folder):
    table = ixi_folder / "list.csv"
    table.write_text("image,brain_mask\nscans/IXI012-HH-1211_T1.nii.gz,masks/IXI012-HH-1211_brainmask.nii.gz\n")
    (pair,) = find_scans(table)
    assert pair.image.samefile(IXI / "IXI012-HH-1211_T1.nii.gz") and pair.brain_mask.name.endswith("brainmask.nii.gz")


def test_bad_training_data_is_named_in_the_error(tmp_path, ixi_folder):
    with pytest.raises(TrainingDataError, match="no such folder"):
        find_scans(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="no NIfTI scans"):
        find_scans(tmp_path / "empty")
    (tmp_path / "masks").mkdir()
    with pytest.raises(TrainingDataError, match="IXI012-HH-1211_T1.nii.gz: expected exactly one brain mask"):
        find_scans(ixi_folder / "scans", tmp_path / "masks")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan_T1.nii.gz").write_bytes(b"not a scan")
    with pytest.raises(TrainingDataError, match="scan_T1.nii.gz"):
        load_model_space(find_scans(broken), ModelSpaceSpec())


def test_subjects_are_split_once_for_good(ixi_folder):
    pairs = find_scans(ixi_folder / "scans", ixi_folder / "masks")
    training, validation = split_subjects(pairs, 0.34, seed=0)
    assert len(validation) == 1 and not {p.subject for p in training} & {p.subject for p in validation}
    assert split_subjects(pairs, 0.34, seed=0) == (training, validation)
    with pytest.raises(TrainingDataError, match="too few"):
        split_subjects(pairs[:1], 0.5, seed=0)


def test_slices_are_drawn_from_the_brain_with_replacement_per_step_and_rank(ixi_scans):
    training, _ = ixi_scans
    sampler = SliceSampler(training, seed=0)
    for scan_number, z in sampler.index:
        assert training[scan_number].brain_mask[z].mean() >= 0.05
    draws = [tuple(map(tuple, sampler.draw(step, 0, 64))) for step in range(3)]
    assert sampler.draw(1, 0, 64).tolist() == [list(d) for d in draws[1]]  # same step, same slices
    assert draws[0] != draws[1] and sampler.draw(0, 1, 64).tolist() != [list(d) for d in draws[0]]
    assert len(set(draws[0])) < 64  # with replacement: 64 draws from ~100 slices repeat some
    slices, masks = sampler.batch(0, 0, 4)
    assert slices.shape == (4, 1, 96, 96) and masks.dtype == torch.bool


# ---------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_stays_in_model_space_and_changes_slices(ixi_training_slices):
    slices, brain = ixi_training_slices
    augmenter = SliceAugmenter(AugmentationSettings(1.0, 1.0, 1.0, 1.0))
    augmented = augmenter(slices, brain, seed=3)
    assert torch.equal(augmented, augmenter(slices, brain, seed=3))
    assert not torch.equal(augmented, augmenter(slices, brain, seed=4))
    assert augmented.min() >= 0 and augmented.max() <= 1
    assert not augmented[~brain].any()  # 0 outside the brain, as at inference
    assert (augmented - slices).abs().mean() > 0.01
    nothing = SliceAugmenter(AugmentationSettings(0.0, 0.0, 0.0, 0.0))
    assert torch.equal(nothing(slices, brain, seed=3), slices)


def test_other_scanner_augmentation_warps_contrast_blurs_one_axis_and_adds_noise(ixi_training_slices):
    """The augmentation for other scanners and protocols: off by default (a model trained before
    keeps its meaning), seeded, inside [0, 1] and the brain, and each part does what it says."""
    slices, brain = ixi_training_slices
    protocols = SliceAugmenter(AugmentationSettings(0.0, 0.0, 0.0, 0.0, histogram_probability=1.0,
                                                    noise_probability=1.0, resolution_probability=1.0))
    augmented = protocols(slices, brain, seed=5)
    assert torch.equal(augmented, protocols(slices, brain, seed=5))
    assert augmented.min() >= 0 and augmented.max() <= 1 and not augmented[~brain].any()
    assert (augmented - slices).abs()[brain].mean() > 0.01
    assert AugmentationSettings().histogram_probability == AugmentationSettings().noise_probability == 0.0
    # A lower resolution along one axis: the slice loses much more detail along it than across it.
    from brain_uad_training.augment import RandLowResolution

    coarse = RandLowResolution(prob=1.0, factor=(3.0, 3.0))
    coarse.set_random_state(0)
    image = slices[0]
    blurred = coarse(image)
    axis = coarse._axis + 1  # (C, H, W)

    def roughness(tensor, dim):
        return tensor.diff(dim=dim).abs().mean()
    along = roughness(blurred, axis) / roughness(image, axis)
    across = roughness(blurred, 3 - axis) / roughness(image, 3 - axis)
    assert along < 0.7 and along < across - 0.1


def test_ghosting_adds_shifted_copies_along_one_axis():
    image = torch.zeros(1, 64, 64)
    image[0, 25:38, 25:38] = 1.0  # a bright square in the middle (width 13: no spectral zeros on the lines)
    ghosting = RandGhosting(prob=1.0, ghosts=(4, 4), strength=(1.0, 1.0))
    ghosting.set_random_state(0)
    ghosted = ghosting(image)
    axis = ghosting._axis
    along = ghosted[0].sum(dim=1 - axis)  # profile along the ghosting axis
    across = ghosted[0].sum(dim=axis)
    outside = torch.ones(64, dtype=torch.bool)
    outside[25:38] = False
    assert along[outside].sum() > 0.05 * along.sum()  # signal moved outside the square along the axis
    assert across[outside].sum() < 1e-3 * across.sum()  # but not across it


# ---------------------------------------------------------------- the command


def test_the_command_trains_from_a_config_file_with_flags_overriding(tmp_path, ixi_folder, capsys):
    settings = tmp_path / "run.toml"
    settings.write_text(
        f'data = "{ixi_folder / "scans"}"\nbrain_masks = "{ixi_folder / "masks"}"\noutput = "out"\n'
        'steps = 50\nbatch_size = 2\nvalidation_fraction = 0.34\nvalidation_slices = 4\n'
        'exclude_subjects = ["IXI014"]\n'
        '[model]\nchannels = [16, 32, 32]\nnorm_num_groups = 8\nnum_head_channels = 16\n'
    )
    assert train_command(["--config", str(settings), "--steps", "2", "--model", '{"noise": "simplex"}', "--quiet"]) == 0
    metadata = read_metadata(tmp_path / "out" / "last.safetensors")  # relative to the config file
    assert metadata["training"]["steps_done"] == 2
    assert metadata["hyperparameters"]["noise"] == "simplex" and metadata["hyperparameters"]["channels"] == [16, 32, 32]
    subjects = metadata["training_data"]["training_subjects"] + metadata["training_data"]["validation_subjects"]
    assert sorted(subjects) == ["IXI012-HH-1211_T1", "IXI013-HH-1212_T1"]  # IXI014 held out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--output", "o"], "'data' is required"),
        (["--data", "/nonexistent", "--output", "o"], "no such folder"),
        (["--data", "SCANS", "--output", "o", "--steps", "0"], "'steps' must be at least 1"),
        (["--data", "SCANS", "--output", "o", "--model", '{"channels": [16]}'], "channels"),
        (["--data", "SCANS", "--output", "o", "--model", '{"colour": 1}'], "unknown"),
        (["--data", "SCANS", "--output", "o", "--brain-masks", "/nonexistent"], "brain-mask folder does not exist"),
    ],
)
def test_the_command_refuses_bad_settings_in_one_line(arguments, message, ixi_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = [str(ixi_folder / "scans") if a == "SCANS" else a for a in arguments]
    assert train_command(arguments + ["--quiet"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_torchrun_trains_with_two_processes(tmp_path, ixi_folder):
    """The distributed launch docs/training.md documents, on CPU (Gloo) with two processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "brain_uad_training", "--quiet", "--data", str(ixi_folder / "scans"),
        "--brain-masks", str(ixi_folder / "masks"), "--output", str(tmp_path / "ddp"), "--steps", "2",
        "--batch-size", "2", "--validation-fraction", "0.34", "--validation-slices", "4",
        "--model", json.dumps(SMALL_MODELS["ddpm"]),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = read_metadata(tmp_path / "ddp" / "last.safetensors")
    assert metadata["training"]["processes"] == 2 and metadata["training"]["steps_done"] == 2
    load_model(tmp_path / "ddp" / "last.safetensors")


# ---------------------------------------------------------------- calibration for shipping


def test_calibration_stores_thresholds_as_users_apply_them(tmp_path, ixi_folder, ixi_scans, shared_data):
    from brain_uad_training.calibrate import main as calibrate_command
    from napari_brain_uad.analysis import AnalysisSettings, analyse_scan
    from napari_brain_uad.checkpoint import load_checkpoint

    fit(small_config(tmp_path, ixi_folder, steps=2), show_progress=False)
    trained = tmp_path / "run" / "best.safetensors"
    output = tmp_path / "calibrated.safetensors"
    mslub = shared_data / "mslub/patient26"
    arguments = ["--model", str(trained), "--output", str(output), "--scorer", "residual",
                 "--lesion-image", str(mslub / "T1.nii.gz"), "--lesion-mask", str(mslub / "lesionmask.nii.gz"),
                 "--lesion-name", "mslub", "--limits", "T1 only", "--training-command", "brain-uad-train --config x",
                 "--quiet"]
    assert calibrate_command(arguments) == 0
    metadata = read_metadata(output)
    healthy, best = metadata["thresholds"]["healthy-99"], metadata["thresholds"]["mslub-dice"]
    assert healthy["scorer"] == best["scorer"] == metadata["default_scorer"] == "residual"
    validation = metadata["training_data"]["validation_subjects"]
    assert healthy["subjects"] == validation and len(validation) == 1

    # On the healthy scan it was calibrated on, through the pipeline users run, about 1 % of the
    # brain scores above the healthy threshold.
    model, _ = load_model(output)
    subject = validation[0].removesuffix("_T1")
    analysis = analyse_scan(read_nifti(IXI / f"{subject}_T1.nii.gz"), model,
                            brain_mask=read_nifti(IXI / "brainmask" / f"{subject}_brainmask.nii.gz"),
                            settings=AnalysisSettings(scorer="residual"))
    above = float(np.mean(analysis.filtered.scores() > healthy["value"]))
    assert 0.005 <= above <= 0.011
    dice = {row["threshold"]: row["mean_dice"] for row in metadata["calibration"]["dice_at_thresholds"]}
    assert dice["mslub-dice"] >= dice["healthy-99"]  # tuned on MSLUB: at least as good there

    # Same weights; the card has what a user needs and no trainer's paths.
    original, _ = load_checkpoint(trained)
    calibrated, _ = load_checkpoint(output)
    assert all(torch.equal(original[name], calibrated[name]) for name in original)
    assert metadata["limits"] == ["T1 only"] and metadata["training_command"] == "brain-uad-train --config x"
    assert metadata["training"]["settings"]["data"] == "scans"
    assert calibrate_command(arguments) == 2  # never over an existing file


def test_the_simplest_commands_take_their_defaults_from_the_kind_and_the_base_model(tmp_path):
    """`--kind vae3d` stopped asking for --no-augment; `--kind sadm --base-model ixi-t1-dae-n4`
    stopped because the run's model space (no N4) was not the base model's."""
    from brain_uad_training.config import ConfigError, TrainingConfig
    from brain_uad_training.fit import _with_base_model_space

    assert TrainingConfig(data="x", output=str(tmp_path), kind="vae3d").augment is False
    assert TrainingConfig(data="x", output=str(tmp_path), kind="dae").augment is True
    with pytest.raises(ConfigError, match="whole volumes"):
        TrainingConfig(data="x", output=str(tmp_path), kind="vae3d", augment=True)
    sadm = _with_base_model_space(TrainingConfig(data="x", output=str(tmp_path), kind="sadm",
                                                 base_model="nichart-flair-dae"))
    assert (sadm.modality, sadm.bias_correction, sadm.spacing_mm) == ("FLAIR", "n4", 2.0)
    chosen = _with_base_model_space(TrainingConfig(data="x", output=str(tmp_path), kind="sadm",
                                                   base_model="ixi-t1-dae-n4", spacing_mm=3.0))
    assert chosen.spacing_mm == 3.0 and chosen.bias_correction == "n4"  # the user's choice stands (and is refused later)
