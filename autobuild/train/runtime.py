"""The pieces of a training step that do not depend on a run: the data loaders (a seeded,
resumable shuffle), the lr schedule, autocast, the memory format and peak memory."""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from autobuild.errors import AutobuildError
from autobuild.train.config import TrainConfig
from autobuild.train.distributed import Dist

__all__ = ["autocast", "channels_last", "check_finite", "lr_factor", "make_loader",
           "peak_mem_mb", "place_model"]


class _EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(ds: Dataset, cfg: TrainConfig, device: torch.device, dist: Dist, train: bool,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """Training: a seeded shuffle (DistributedSampler under DDP); validation: in order, each
    rank an exact shard (no padding duplicates), so summed metrics are exact."""
    workers = cfg.workers if cfg.workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    sampler: Sampler[int] | None = None
    if train:
        if dist.enabled:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, dist.world_size, dist.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=True)
        else:
            sampler = _EpochSampler(len(ds), cfg.seed)  # type: ignore[arg-type]
    elif dist.enabled:
        ds = Subset(ds, range(dist.rank, len(ds), dist.world_size))  # type: ignore[arg-type]
    # Dropping a ragged last batch keeps BN away from 1-sample batches, unless that is all.
    drop = train and len(ds) // dist.world_size > cfg.batch_size  # type: ignore[arg-type]
    return DataLoader(ds, cfg.batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop,
                      persistent_workers=workers > 0, collate_fn=collate_fn)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier per optimizer step: linear warm-up, then cosine to zero or steps."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(min(cfg.warmup_epochs, cfg.max_warmup()) * steps_per_epoch)
    bounds = [m * steps_per_epoch for m in cfg.milestones()]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "multistep":
            return cfg.lr_gamma ** sum(step >= b for b in bounds)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if not cfg.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model on ``device`` in the recipe's memory format (for evaluation)."""
    model = model.to(device)
    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def check_finite(model: nn.Module, what: str = "the model's weights") -> None:
    """Refuse weights that already hold NaN or infinite values (saved from a run that blew
    up, or edited): training them reports a divergence that is not one, and an evaluation
    scores nothing."""
    from autobuild.summary import nonfinite_tensors

    bad = nonfinite_tensors(model)
    if bad:
        first, count = next(iter(bad.items()))
        more = f" and {len(bad) - 1} more tensor{'s' * (len(bad) > 2)}" if len(bad) > 1 else ""
        raise AutobuildError(f"{what} are not finite: {first} holds {count} NaN "
                             f"or infinite value{'s' * (count > 1)}{more} (weights saved from "
                             "a run that diverged?); `autobuild inspect` lists them")
