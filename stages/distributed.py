"""Several processes under torchrun (stages/finetune.py's DDP): where this process stands in the job, and the few
collectives the training loop needs. With one process (no torchrun) every helper is a no-op on its own values.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; world_size 1 is a plain single process."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes (checkpoints, curves, metrics, the export)."""
        return self.rank == 0


SINGLE = Distributed()


def init_distributed() -> Distributed:
    """Join the torchrun job described by $WORLD_SIZE, $RANK and $LOCAL_RANK (NCCL with CUDA, one GPU per process;
    gloo on CPU); without torchrun (or with one process) a plain single process, SINGLE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)


def sum_over_ranks(values: Sequence[float], ddp: Distributed, device: torch.device) -> list[float]:
    """Element-wise sums over all processes (the values themselves without DDP)."""
    if ddp.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def rank_states(state: dict[str, Any], ddp: Distributed) -> list[dict[str, Any]]:
    """Every rank's `state` (a collective: all ranks call it), in rank order."""
    if ddp.world_size == 1:
        return [state]
    states: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(states, state)
    return states


def barrier(ddp: Distributed) -> None:
    """Wait for every process (nothing without DDP)."""
    if ddp.world_size > 1:
        dist.barrier()
