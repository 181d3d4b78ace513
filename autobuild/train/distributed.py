"""DDP through torchrun: process-group setup, rank helpers and metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "init_distributed", "wait_for_all_ranks"]


@dataclass
class Dist:
    """Where this process sits: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place); a no-op for one process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)  # all_gather: the one NCCL and gloo both support
        return out if self.is_main else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite every rank's ``tensors`` (in place) with rank 0's."""
        if self.enabled:
            for t in tensors:
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) if WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local)


def wait_for_all_ranks(device_name: str) -> None:
    """Block until every torchrun rank gets here (a no-op in one process), so that what
    the ranks read before (a run's record, a saved model's weights) is read by all before
    rank 0 replaces it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from autobuild.train.devices import resolve_device

    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(device)
    if device.type == "cuda":  # (NCCL must be told which GPU this rank's barrier uses)
        dist.barrier(device_ids=[device.index or 0])
    else:
        dist.barrier()
