"""Sharding a run over processes with ``torch.distributed``: torchrun, or Slurm through submitit.

Chunk i goes to rank ``i mod world_size``; every rank writes its own chunk files, and rank 0 gathers every chunk's
per-sample values and cost, then alone writes the metrics, the grids, the W&B run and the status. The process
group is gloo on the CPU and NCCL on CUDA, set up once per process from the environment that torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or that submitit's
``TorchDistributedEnvironment`` exports inside a Slurm job of several tasks.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffexp.errors import DiffexpError

log = logging.getLogger("diffexp")

TIMEOUT = timedelta(minutes=60)  # a collective waits this long for a slow rank (a long chunk) before failing


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.size == self.rank


def submitit_tasks() -> int:
    """Tasks of this submitit job (Slurm, or submitit's local executor); 1 outside submitit."""
    if not any(k in os.environ for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID")):
        return 1
    from submitit import JobEnvironment

    return JobEnvironment().num_tasks


def world(use_cuda: bool) -> World:
    """This process's place among the run's processes, joining the process group on first use."""
    if "WORLD_SIZE" not in os.environ and submitit_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment  # a submitit job of several tasks

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except Exception as err:
            raise DiffexpError(
                f"Could not join the process group of {size} processes ({backend}): {err}. Launch with torchrun "
                "(or Slurm through submitit), which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."
            ) from None
        log.info("rank %d of %d (%s)", dist.get_rank(), size, backend)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def broadcast(value: Any, w: World) -> Any:
    """Rank 0's ``value``, on every rank."""
    if w.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, w: World) -> list[Any] | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the others."""
    if w.size == 1:
        return [value]
    out: list[Any] | None = [None] * w.size if w.main else None
    dist.gather_object(value, out, dst=0)
    return out


def shared_dir(out_dir: Path, w: World) -> Path:
    """The run folder of rank 0, on every rank. Each process composed its own folder name (its own time and id):
    another rank's own folder, holding only Hydra's record, is removed."""
    shared = Path(broadcast(str(out_dir), w))
    mine = Path(out_dir)
    if mine.resolve() != shared.resolve() and mine.is_dir() and all(p.name == ".hydra" for p in mine.iterdir()):
        shutil.rmtree(mine, ignore_errors=True)
    return shared
