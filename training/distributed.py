"""One code path for one process or many: PyTorch's own launcher (``torchrun``) and DDP.

``torchrun --nproc_per_node=N -m brain_uad_training ...`` starts N copies of the same command
with RANK, WORLD_SIZE and LOCAL_RANK in their environment; a plain ``brain-uad-train`` has none
and runs as a single process. Each process trains on its own slices (the sampler draws by
rank), DistributedDataParallel averages the gradients, so the weights stay identical and only
rank 0 writes checkpoints, logs and the progress bar. GPUs talk over NCCL, CPUs over Gloo.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napari_brain_uad.reconstruct import pick_device


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device_preference: str = "auto") -> Processes:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(0, 1, pick_device(device_preference))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def mean_loss_and_stop(processes: Processes, loss: float, stop_requested: bool) -> tuple[float, bool]:
    """The loss averaged over processes, and whether any process was asked to stop, so that
    every process leaves the loop after the same step (one leaving alone would hang the rest)."""
    if not processes.distributed:
        return loss, stop_requested
    values = torch.tensor([loss, float(stop_requested)], dtype=torch.float64, device=processes.device)
    dist.all_reduce(values)
    return float(values[0]) / processes.world_size, bool(values[1] > 0)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the current step, so the optimizer
    never stops half-way through an update and the last checkpoint is consistent. A second
    Ctrl-C stops at once (files are still whole: every write is atomic)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
