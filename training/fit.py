"""The training loop: healthy slices in, versioned checkpoints out.

``fit(config)`` reads the scans into model space, splits subjects into training and
validation, and runs Adam on the model's own training loss: on batches of slices, or of whole
volumes for a volumetric kind (the 3D VAE). It writes into the output folder:

- ``last.safetensors``: the model after the latest validation (or the stop), loadable by the
  plugin like any checkpoint;
- ``best.safetensors``: the model with the lowest validation loss so far (the papers pick
  their model this way);
- ``training_state.safetensors``: optimizer moments and the step, to resume;
- ``log.jsonl``: one JSON line per step (training loss) and per validation.

Every random draw of step k comes from generators seeded by (seed, k, rank): the slices, their
augmentation, the model's noise and noise levels. So a fixed seed gives the same run, and a run
resumed from step k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import napari_brain_uad
from napari_brain_uad.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from napari_brain_uad.downloads import file_sha256
from napari_brain_uad.errors import BrainUADError
from napari_brain_uad.model_registry import resolve_model
from napari_brain_uad.models import MODEL_KINDS, ReconstructionModel, build_model, load_model, save_model

from . import distributed
from .augment import SliceAugmenter
from .config import ConfigError, TrainingConfig
from .data import (
    ModelSpaceScan,
    SliceSampler,
    VolumeSampler,
    find_scans,
    load_model_space,
    split_subjects,
    validation_slices,
    validation_volumes,
)
from .pretrain_denoise import pretrain_denoising
from .pretrain_encoder import pretrain_encoder_masked

BEST, LAST, STATE, LOG = "best.safetensors", "last.safetensors", "training_state.safetensors", "log.jsonl"
STATE_KIND = "training-state"
# Settings a resumed run may change: how long to train, how often to validate, where.
RESUMABLE_CHANGES = {"steps", "validate_every", "device"}


@dataclass
class TrainingResult:
    output: Path
    last: Path
    best: Path | None
    steps_done: int
    stopped_early: bool
    best_validation_loss: float | None
    validation_history: list[tuple[int, float]] = field(default_factory=list)


class _LossOf(torch.nn.Module):
    """The model's training loss as a forward pass, so DistributedDataParallel sees it (DDP
    synchronises gradients for what runs through its wrapper's forward)."""

    def __init__(self, model: ReconstructionModel):
        super().__init__()
        self.model = model

    def forward(self, slices, brain_mask, generator, excluded=None):
        if excluded is None:  # kinds without exclusion support keep their own signature
            return self.model.training_loss(slices, brain_mask, generator)
        return self.model.training_loss(slices, brain_mask, generator, excluded=excluded)


def fit(
    config: TrainingConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    scans: tuple[list[ModelSpaceScan], list[ModelSpaceScan]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train ``config.kind`` on healthy scans; see the module docstring for what is written.

    ``resume`` continues from the output folder's state; ``overwrite`` starts afresh over a
    previous run's files (otherwise they are never replaced). ``scans`` gives training and
    validation scans already in model space (tests, notebooks); ``on_step(step, loss)`` is
    called after every step with this process's loss.
    """
    processes = distributed.start(config.device)
    try:
        return _fit(config, processes, resume, overwrite, show_progress, scans, on_step)
    finally:
        distributed.stop(processes)


def _fit(config, processes, resume, overwrite, show_progress, scans, on_step) -> TrainingResult:
    output = Path(config.output)
    _check_output(output, resume, overwrite)
    show = show_progress and processes.is_main
    config = _with_base_model_space(config)
    spec = config.model_space_spec()

    if scans is None:
        pairs = find_scans(config.data if isinstance(config.data, str) else list(config.data), config.brain_masks)
        if config.exclude_subjects:
            pairs = [pair for pair in pairs if not pair.subject.startswith(tuple(config.exclude_subjects))]
            if not pairs:
                raise ConfigError("every scan is excluded by 'exclude_subjects'")
        _check_exclusions_fit(config, any(pair.exclude_mask is not None for pair in pairs))
        training_pairs, validation_pairs = split_subjects(pairs, config.validation_fraction, config.seed)
        with tqdm(total=len(pairs), desc="scans to model space", unit="scan", disable=not show) as bar:
            def advance(done, total):
                bar.update(1)
            growth = lesion_mask_growth_mm(config)
            training_scans = load_model_space(training_pairs, spec, advance, growth)
            validation_scans = load_model_space(validation_pairs, spec, advance, growth)
    else:
        training_scans, validation_scans = scans
        _check_exclusions_fit(config, any(scan.exclude is not None for scan in [*training_scans, *validation_scans]))
    torch.manual_seed(config.seed)  # the same initial weights for the same seed, on every rank
    model, base_description = _build_model(config, spec)
    model = model.to(processes.device)
    if model.volumetric:
        # Whole volumes per step; the config refuses slice augmentation for these kinds.
        sampler = VolumeSampler(training_scans, config.seed, model.depth_slices)
        validation = (validation_volumes(validation_scans, config.validation_slices, model.depth_slices)
                      if validation_scans else None)
    else:
        sampler = SliceSampler(training_scans, config.seed,
                               thick_slices=(config.thick_slice_probability, config.thickest_slice))
        validation = validation_slices(validation_scans, config.validation_slices) if validation_scans else None
    augmenter = SliceAugmenter(config.augmentation_settings()) if config.augment else None
    # Only what trains: a frozen part (SADM's base model) has no gradients and no Adam moments.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    start_step, best_loss, best_step, history, best_stage = 0, math.inf, None, [], None
    if resume:
        start_step, best_loss, best_step, history, best_stage = _restore(output, config, model, optimizer,
                                                                         processes.device)
    elif config.pretrain_encoder_steps:
        _pretrain_encoder(model, sampler, config, processes, show)
    pretrain_losses = _pretrain_denoising(model, sampler, config, processes, show) if config.pretrain and not resume else []
    loss_of = _LossOf(model)
    if processes.distributed:
        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        # A kind trained in stages leaves some trainable parameters without gradients in each.
        loss_of = torch.nn.parallel.DistributedDataParallel(loss_of, device_ids=device_ids,
                                                            find_unused_parameters=model.stage is not None)

    description = {
        "training_subjects": [scan.subject for scan in training_scans],
        "validation_subjects": [scan.subject for scan in validation_scans],
        "description": config.data_description,
        "licence": config.data_licence,
        ("training_volumes" if model.volumetric else "training_slices"): len(sampler),
        **base_description,
    }
    log = _Log(output / LOG, start_step, enabled=processes.is_main)
    for number, loss in enumerate(pretrain_losses, start=1):
        log.write({"step": 0, "pretrain_step": number, "pretrain_loss": loss})

    def checkpoint(step: int, finished: bool) -> None:
        nonlocal best_loss, best_step, best_stage
        validation_loss = None
        if validation is not None and (not history or history[-1][0] != step):
            validation_loss = _validation_loss(model, validation, config, processes.device)
            history.append((step, validation_loss))
            log.write({"step": step, "validation_loss": validation_loss})
        if processes.is_main:
            current = history[-1][1] if history else None
            # A kind trained in stages (PHANES: its VAE, then its inpainting GAN) has another loss
            # in each; a later stage's model is the one to keep, so its first validation is the best.
            stage = model.stage
            improved = current is not None and (current < best_loss or stage != best_stage)
            if improved:
                best_loss, best_step, best_stage = current, step, stage
            extra = _metadata(config, description, processes, step, finished, history, best_loss, best_step)
            save_model(output / LAST, model, extra, overwrite=True)
            if improved:
                save_model(output / BEST, model, extra, overwrite=True)
            _save_state(output / STATE, optimizer, step, config, history, best_loss, best_step, best_stage)
        distributed.barrier(processes)

    step, stopped = start_step, False
    with distributed.StopRequest() as stop, tqdm(
        total=config.steps, initial=start_step, desc=f"training {config.kind}", unit="step", disable=not show
    ) as bar:
        if step == 0 and validation is not None:
            checkpoint(0, finished=False)
        while step < config.steps:
            model.train()
            if model.volumetric:
                slices, brain_mask = sampler.batch(step, processes.rank, config.batch_size)
                excluded = None
            else:
                slices, brain_mask, excluded = sampler.training_batch(step, processes.rank, config.batch_size)
            if augmenter is not None:
                slices = augmenter(slices, brain_mask, _seed_of(config.seed, step, processes.rank, 1))
            slices, brain_mask = slices.to(processes.device), brain_mask.to(processes.device)
            if excluded is not None:
                excluded = excluded.to(processes.device)
            generator = _generator(processes.device, _seed_of(config.seed, step, processes.rank, 2))
            loss = loss_of(slices, brain_mask, generator, excluded)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.gradient_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip_norm)
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step, float(loss.detach()))
            mean_loss, stopped = distributed.mean_loss_and_stop(processes, float(loss.detach()), stop.requested)
            log.write({"step": step, "loss": mean_loss})
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", val=f"{history[-1][1]:.4f}" if history else "-")
            if stopped:
                break
            if step % config.validate_every == 0 and step < config.steps:
                checkpoint(step, finished=False)
        checkpoint(step, finished=not stopped)
    if stopped and processes.is_main:
        tqdm.write(f"stopped after step {step}; resume with the same command and --resume")
    log.close()
    return TrainingResult(
        output=output,
        last=output / LAST,
        best=output / BEST if (output / BEST).exists() else None,
        steps_done=step,
        stopped_early=stopped,
        best_validation_loss=None if best_step is None else best_loss,
        validation_history=list(history),
    )


def _learns_lesions(config: TrainingConfig) -> bool:
    """Whether the run's model learns the training list's lesion masks as targets (a labelled
    SADM) instead of leaving them out."""
    return config.kind == "sadm" and dict(config.model).get("supervision") == "labelled"


def lesion_mask_growth_mm(config: TrainingConfig) -> float:
    """How far the training list's lesion masks are grown: targets are taken as drawn; masks
    left out of a loss grow by ``exclude_dilation_mm``, to cover the lesions' fuzzy edges."""
    return 0.0 if _learns_lesions(config) else config.exclude_dilation_mm


def _check_exclusions_fit(config: TrainingConfig, has_exclusions: bool) -> None:
    """Refuse exclusion masks a run would not honour, before any scan is read: a kind whose loss
    cannot leave voxels out, or a denoising pre-training (it would learn the lesions first); and
    a labelled SADM without lesion masks to learn."""
    if _learns_lesions(config) and not has_exclusions:
        raise ConfigError("a labelled SADM (supervision = \"labelled\") learns real lesions: give a training list "
                          "with an exclude_mask column holding each scan's lesion mask")
    if not has_exclusions:
        return
    if not MODEL_KINDS[config.kind].excludes_voxels:
        kinds = ", ".join(name for name, kind in MODEL_KINDS.items() if kind.excludes_voxels)
        raise ConfigError(f"the training list has exclusion masks, but the {config.kind} kind cannot leave voxels "
                          f"out of its loss (kinds that can: {kinds}); remove the exclude_mask column or pick one")
    if config.pretrain:
        raise ConfigError("the denoising pre-training (pretrain) does not leave the exclusion masks' voxels out; "
                          "train without it, or without the exclude_mask column")


def _with_base_model_space(config: TrainingConfig) -> TrainingConfig:
    """A kind that sits on a trained model (SADM) works in that model's space: the settings of
    the model space the user left at their defaults are the base model's (a choice that differs
    is refused later, saying so)."""
    if not config.base_model:
        return config
    try:
        base = read_metadata(resolve_model(config.base_model)).get("model_space")
    except (BrainUADError, CheckpointError, OSError) as error:
        raise ConfigError(f"base model {config.base_model}: {error}") from None
    if not base:
        return config
    defaults = TrainingConfig.__dataclass_fields__
    changes = {}
    for name in ("spacing_mm", "in_plane", "modality", "bias_correction"):  # named alike in both
        if getattr(config, name) == defaults[name].default and name in base:
            changes[name] = tuple(base[name]) if name == "in_plane" else base[name]
    return dataclasses.replace(config, **changes) if changes else config


def _build_model(config: TrainingConfig, spec) -> tuple[ReconstructionModel, dict[str, Any]]:
    """A fresh model of the config's kind; a kind that sits on a trained model (SADM) gets that
    model's network and weights as its frozen base, and the card records which file it was."""
    if not config.base_model:
        return build_model(config.kind, config.model, spec), {}
    try:
        path = resolve_model(config.base_model)
        base, _ = load_model(path)
    except (BrainUADError, CheckpointError, OSError) as error:
        raise ConfigError(f"base model {config.base_model}: {error}") from None
    if base.spec.to_dict() != spec.to_dict():
        raise ConfigError(f"base model {config.base_model} works in another model space ({base.spec.to_dict()}) "
                          f"than this run ({spec.to_dict()}); set the run's spacing, slice size, modality and "
                          "bias correction to the base model's")
    hyperparameters = {**config.model, "base_kind": base.kind, "base_hyperparameters": base.config.to_dict()}
    model = build_model(config.kind, hyperparameters, spec)
    model.load_base(base)
    return model, {"base_model": {"name": config.base_model, "kind": base.kind, "sha256": file_sha256(path)}}


def _pretrain_denoising(model, sampler, config, processes, show) -> list[float]:
    """ADDP's denoising pre-training on the training slices (the same on every process); its
    losses, for the run's log."""
    generator = _generator(processes.device, _seed_of(config.seed, 5))
    batches = (sampler.batch(step, 0, config.batch_size, stream=2)[0].to(processes.device)
               for step in range(config.pretrain_steps))
    with tqdm(total=config.pretrain_steps, desc=f"pre-training ({config.pretrain})", unit="step",
              disable=not show) as bar:
        return pretrain_denoising(model, batches, mode=config.pretrain, learning_rate=config.learning_rate,
                                  generator=generator, on_step=lambda step, loss: bar.update(1))


def _pretrain_encoder(model, sampler, config, processes, show) -> None:
    """cDDPM's optional masked pre-training of its context encoder, on the same training slices
    (every process does the same steps on the same slices, so the encoders stay identical)."""

    def batches():
        for step in range(config.pretrain_encoder_steps):
            yield sampler.batch(step, 0, config.batch_size, stream=1)[0]

    generator = _generator(processes.device, _seed_of(config.seed, 4))
    with tqdm(total=config.pretrain_encoder_steps, desc="pre-training the encoder", unit="step", disable=not show) as bar:
        def counted():
            for batch in batches():
                yield batch
                bar.update(1)
        pretrain_encoder_masked(model, counted(), steps=config.pretrain_encoder_steps, batch_size=config.batch_size,
                                lr=config.learning_rate, generator=generator)


def _check_output(output: Path, resume: bool, overwrite: bool) -> None:
    ours = [output / name for name in (BEST, LAST, STATE, LOG)]
    if resume:
        if not (output / STATE).is_file() or not (output / LAST).is_file():
            raise ConfigError(f"{output}: nothing to resume (no {STATE} and {LAST} there)")
        return
    existing = [path.name for path in ours if path.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{output}: holds a previous run ({', '.join(existing)}); resume it with --resume, "
            "start afresh with --overwrite, or choose another output folder"
        )
    output.mkdir(parents=True, exist_ok=True)
    for path in ours:
        path.unlink(missing_ok=True)


def _seed_of(*numbers: int) -> int:
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # MPS has no generator of its own; draws are made on the CPU and moved by the models.
    generator = torch.Generator(device="cpu" if device.type == "mps" else device)
    generator.manual_seed(seed)
    return generator


@torch.no_grad()
def _validation_loss(model, validation, config: TrainingConfig, device) -> float:
    """The training loss on fixed healthy validation slices with fixed random draws, so that
    numbers from different steps compare the model, not the luck of the draw."""
    slices, brain_mask, *rest = validation
    excluded = rest[0] if rest else None
    model.eval()
    total = 0.0
    for start in range(0, len(slices), config.batch_size):
        part = slice(start, start + config.batch_size)
        generator = _generator(device, _seed_of(config.seed, start, 3))
        arguments = {} if excluded is None else {"excluded": excluded[part].to(device)}
        loss = model.training_loss(slices[part].to(device), brain_mask[part].to(device), generator, **arguments)
        total += float(loss) * len(slices[part])
    model.train()
    return total / len(slices)


def _metadata(config, description, processes, step, finished, history, best_loss, best_step) -> dict[str, Any]:
    return {
        "training": {
            "settings": config.to_dict(),
            "steps_done": step,
            "finished": finished,
            "processes": processes.world_size,
            "device": processes.device.type,
            "napari_brain_uad_version": napari_brain_uad.__version__,
            "torch_version": torch.__version__,
        },
        "training_data": description,
        "validation": {
            "loss": history[-1][1] if history else None,
            "best_loss": None if best_step is None else best_loss,
            "best_step": best_step,
            "history": [list(entry) for entry in history],
        },
    }


def _save_state(path: Path, optimizer, step, config, history, best_loss, best_step, best_stage) -> None:
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{name}": torch.as_tensor(value)
        for index, moments in state["state"].items()
        for name, value in moments.items()
    }
    groups = [{**group, "betas": list(group["betas"])} if "betas" in group else group for group in state["param_groups"]]
    save_checkpoint(path, tensors, {
        "kind": STATE_KIND,
        "step": step,
        "settings": config.to_dict(),
        "param_groups": groups,
        "history": [list(entry) for entry in history],
        "best_loss": None if best_step is None else best_loss,
        "best_step": best_step,
        "best_stage": best_stage,
    }, overwrite=True)


def _restore(output: Path, config, model, optimizer, device):
    """Weights from last.safetensors and the optimizer from the state file, checked against the
    settings: a resumed run must train the same model on the same data."""
    tensors, state = load_checkpoint(output / STATE, device="cpu")
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(f"{output / STATE}: not a training state")
    # A setting added after the run started was at its default then.
    defaults = {field.name: getattr(TrainingConfig, field.name) for field in dataclasses.fields(TrainingConfig)
                if field.default is not dataclasses.MISSING}
    stored, current = state["settings"], config.to_dict()
    changed = sorted(name for name in current if name not in RESUMABLE_CHANGES
                     and stored.get(name, defaults.get(name)) != current[name])
    if changed:
        raise ConfigError(
            f"{output}: cannot resume with different {', '.join(changed)} (only {', '.join(sorted(RESUMABLE_CHANGES))} "
            "may change); start a new run in another folder instead"
        )
    saved, _ = load_model(output / LAST, device=device)
    model.load_state_dict(saved.state_dict())
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        moments.setdefault(int(index), {})[name] = value
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in state["param_groups"]]
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    if int(state["step"]) > config.steps:
        raise ConfigError(f"{output}: the run already did {state['step']} steps, more than steps = {config.steps}")
    best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
    history = [(int(s), float(v)) for s, v in state["history"]]
    return int(state["step"]), best_loss, state["best_step"], history, state.get("best_stage")


class _Log:
    """log.jsonl, one JSON object per line; a resumed run drops lines after its resume point."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.handle = None
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            # The validation at the resume step is restored from the state, not re-run.
        self.handle = open(path, "w")
        for line in kept:
            self.handle.write(line + "\n")
        self.handle.flush()
        self.started = time.time()

    def write(self, entry: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps({**entry, "seconds": round(time.time() - self.started, 3)}) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
