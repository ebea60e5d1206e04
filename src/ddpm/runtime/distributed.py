"""More than one process: plain PyTorch DistributedDataParallel, started by ``torchrun``.

``ddpm train`` (and :func:`ddpm.training.train.train`) runs unchanged under ``torchrun`` or
``accelerate launch``: both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, and that is all this module reads. Plain DDP rather than Accelerate: one
network and one optimiser need nothing Accelerate adds, the loop already handles devices,
precision and compilation itself, and it keeps the dependency list short.

The global batch is ``train.batch_size``, split evenly over the processes; every process
draws the same global batch, timesteps and noise from the shared seed and keeps its own
slice. So the data and randomness do not depend on the number of processes: two processes
follow the same trajectory as one (up to float rounding in the gradient sum), the learning
rate means the same thing for any process count, and a run resumes under a different
number of processes.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DdpmError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is the single-process case."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        """Only the main process writes logs, samples and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, global_batch: int) -> slice:
        """This process's slice of a global batch."""
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def max(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise maximum over processes (a flag raised anywhere is raised everywhere)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over processes."""
        if not self.active:
            return x
        x = x.detach().clone().to(torch.float64)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DdpmError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the job the launcher describes (or none); the device this process should use."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist(), device
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise DdpmError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DdpmError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        except (ValueError, RuntimeError) as e:
            raise DdpmError(f"cannot join the {world}-process job (rank {rank}): {e}; "
                            "start it with torchrun or accelerate launch") from None
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DdpmError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                        f"but the environment says {rank} of {world}")
    return Dist(rank, world, local, owns), device


def shutdown(d: Dist) -> None:
    """End the process group if this module started it."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
