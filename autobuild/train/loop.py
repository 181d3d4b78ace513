"""The training loop: ``train(model, data, config, callback=...) -> Result``.

GPU first (AMP, channels_last, torch.compile, DDP), CPU always. Rank 0 writes the run
directory: ``plan.yaml``, ``weights.safetensors`` (best epoch), ``last.safetensors``,
``checkpoint.pt`` (resumable), ``metrics.csv`` and ``train.yaml``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from autobuild.errors import AutobuildError
from autobuild.io import PLAN_FILE, atomic_copy, atomic_write_text, save_plan, save_weights
from autobuild.optim import param_groups
from autobuild.rewrite import plan_of, record_of, set_record
from autobuild.train.checkpoint import (
    CHECKPOINT_FILE,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from autobuild.train.config import TrainConfig
from autobuild.train.data import Data, build_data
from autobuild.train.distributed import Dist, init_distributed
from autobuild.train.metrics import EpochMetrics, write_csv
from autobuild.train.runs import RUN_FILE

__all__ = ["BEST_WEIGHTS", "LAST_WEIGHTS", "Callback", "DivergedError", "Result",
           "check_fits", "evaluate", "resolve_device", "train"]

BEST_WEIGHTS = "weights.safetensors"  # what autobuild.load() and `evaluate` read
LAST_WEIGHTS = "last.safetensors"

#: Called after every epoch (on every rank, with the same metrics); returning False stops
#: the run after that epoch (pruning by a search).
Callback = Callable[[EpochMetrics], "bool | None"]


class DivergedError(AutobuildError):
    """The loss became NaN or infinite: the run stops, the CLI exits with code 3."""

    exit_code = 3


@dataclass
class Result:
    """What a run produced. ``model`` is the final (EMA, if enabled) model on its device."""

    model: nn.Module
    history: list[EpochMetrics] = field(default_factory=list)
    best_top1: float = 0.0
    best_epoch: int = 0
    stopped_early: bool = False
    out_dir: str | None = None
    seconds: float = 0.0

    @property
    def last(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AutobuildError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
        if name == "cuda":  # one GPU per torchrun process
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise AutobuildError(f"bad --device {name!r}: {exc}") from exc


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


def _loader(ds: Dataset, cfg: TrainConfig, device: torch.device, dist: Dist, train: bool
            ) -> DataLoader:
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
    elif dist.enabled:  # an exact shard (no padding duplicates): val sums are then exact
        ds = Subset(ds, range(dist.rank, len(ds), dist.world_size))  # type: ignore[arg-type]
    # Dropping a ragged last batch keeps BN away from 1-sample batches, unless that is all.
    drop = train and len(ds) // dist.world_size > cfg.batch_size  # type: ignore[arg-type]
    return DataLoader(ds, cfg.batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop,
                      persistent_workers=workers > 0)


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(min(cfg.warmup_epochs, cfg.epochs / 4) * steps_per_epoch)

    def factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    if not cfg.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device,
              dist: Dist, num_classes: int) -> tuple[float, float, float]:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    k = min(5, num_classes)
    mem = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=mem)
        y = y.to(device, non_blocking=True)
        with _autocast(cfg, device):
            out = model(x)
        out = out.float()
        top = out.topk(k, dim=1).indices == y[:, None]
        sums += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum").double(),
                             top[:, 0].sum().double(), top.any(1).sum().double(),
                             torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    loss, top1, top5, n = dist.all_sum(sums).tolist()
    n = max(n, 1.0)
    return loss / n, 100 * top1 / n, 100 * top5 / n


def _channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def _save_weights(model: nn.Module, out: str, name: str) -> None:
    # No model copy: safetensors moves CUDA tensors to the CPU itself, and save_weights
    # writes channels_last weights contiguously (force_contiguous).
    save_weights(model, os.path.join(out, name))


def _copy_weights(out: str, src: str, dst: str) -> None:
    """The best epoch is the epoch just saved: copy its file rather than serialise again."""
    atomic_copy(os.path.join(out, src), os.path.join(out, dst))


def evaluate(model: nn.Module, data: Data | str, config: TrainConfig | None = None
             ) -> dict[str, float]:
    """Val loss, top-1 and top-5 (%) of ``model`` on ``data``'s val split, and images/s."""
    cfg = config or TrainConfig()
    data = build_data(data) if isinstance(data, str) else data
    device = resolve_device(cfg.device)
    model = model.to(device)
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    loss, top1, top5 = _evaluate(model, _loader(data.val, cfg, device, Dist(), False), cfg,
                                 device, Dist(), data.num_classes)
    seconds = time.perf_counter() - start
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5, "images": len(data.val),
            "seconds": seconds, "images_per_s": len(data.val) / max(seconds, 1e-9)}


def check_fits(model: nn.Module, data: Data) -> None:
    """Fail in one line, before any training, when the model does not match the data."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *data.input_size))
    except RuntimeError as exc:
        raise AutobuildError(f"the model does not accept {data.name} images "
                             f"{'x'.join(map(str, data.input_size))}: "
                             f"{str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AutobuildError(f"the model outputs {shape} for a batch of 2 but {data.name} has "
                             f"{data.num_classes} classes: rebuild it with --num-classes "
                             f"{data.num_classes}")


def train(model: nn.Module, data: Data | str, config: TrainConfig | None = None, *,
          callback: Callback | None = None, out_dir: str | None = None,
          resume: bool = False) -> Result:
    """Train ``model`` on ``data`` with ``config``; see the module docstring for ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.pt`` (model, optimizer, scheduler,
    scaler, EMA, epoch, RNG state). Refusing to overwrite another run is the caller's job
    (:func:`autobuild.train.prepare_run_dir`). Raises :class:`DivergedError` on a
    non-finite loss.
    """
    cfg = config or TrainConfig()
    data = build_data(data) if isinstance(data, str) else data
    if out_dir and plan_of(model) is None:
        raise AutobuildError("saving a run needs a model with a plan (autobuild.convert/load)")
    check_fits(model, data)
    start_time = time.perf_counter()
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed + dist.rank)  # ranks augment differently; DDP syncs weights
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan = plan_of(model)
    families = {c.family for c in plan.conversions} if plan else set()
    max_norm = cfg.max_grad_norm(families)

    model = model.to(device)
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and device.type != "cuda":
        raise AutobuildError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only)")
    if dist.enabled and cfg.sync_bn:
        record = record_of(model)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if record is not None:
            set_record(model, record)
    base = model  # the module that is saved and evaluated; `net` is what trains
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]

    groups = param_groups(base, cfg.decay(), lr=cfg.peak_lr())
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.peak_lr(),
                                                     momentum=cfg.momentum,
                                                     nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.peak_lr())
    train_loader = _loader(data.train, cfg, device, dist, True)
    val_loader = _loader(data.val, cfg, device, dist, False)
    steps = len(train_loader)
    if steps == 0:
        raise AutobuildError(f"{data.name} has too few training images for one batch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "fp16")
    ema = None
    if cfg.ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(base, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[EpochMetrics] = []
    first_epoch, best_top1, best_epoch = 1, -1.0, 0
    ckpt_path = os.path.join(out_dir, CHECKPOINT_FILE) if out_dir else ""
    if resume:
        if not out_dir:
            raise AutobuildError("resume needs the run directory (out_dir)")
        state = load_checkpoint(ckpt_path)
        try:
            base.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AutobuildError(f"checkpoint {ckpt_path!r} does not match this model/recipe: "
                                 f"{str(exc).splitlines()[0]}") from exc
        history = [EpochMetrics.from_dict(m) for m in state["history"]]
        first_epoch = int(state["epoch"]) + 1
        best_top1, best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        set_rng_state(state["rng"])
    if out_dir and dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        save_plan(plan, os.path.join(out_dir, PLAN_FILE))
        _write_run_file(out_dir, data, cfg)

    eval_model = ema.module if ema is not None else base
    mem = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    stopped = False
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        net.train()
        sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, n, bad
        bar = None
        if cfg.progress and dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                       leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(train_loader, 1):
            x = x.to(device, non_blocking=True, memory_format=mem)
            y = y.to(device, non_blocking=True)
            with _autocast(cfg, device):
                out = net(x)
                loss = criterion(out.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if max_norm is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(base.parameters(), max_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update_parameters(base)
            # Accumulate on the device: no host sync per step (it would stall the GPU).
            d = loss.detach().double()
            sums += torch.stack([d * len(y), (out.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), device=device, dtype=torch.float64),
                                 (~torch.isfinite(d)).double()])
            if i % cfg.log_interval == 0 or i == steps:
                # Every rank checks at the same steps, on the summed flag: no rank hangs.
                tot = dist.all_sum(sums.clone()).tolist()
                if tot[3] > 0:
                    if bar is not None:
                        bar.close()
                    raise DivergedError(
                        f"training diverged: non-finite loss in epoch {epoch} (step {i}); "
                        "lower --lr, keep --clip-grad (e.g. 0.5), or use --amp-dtype bf16")
                if bar is not None:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{tot[0] / tot[2]:.3f}",
                                    acc=f"{100 * tot[1] / tot[2]:.1f}%",
                                    img_s=f"{tot[2] / elapsed:.0f}")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        loss_sum, correct, n, _ = dist.all_sum(sums).tolist()
        val_loss, top1, top5 = _evaluate(eval_model, val_loader, cfg, device, dist,
                                         data.num_classes)
        metrics = EpochMetrics(epoch, loss_sum / n, 100 * correct / n, val_loss, top1, top5,
                               opt.param_groups[0]["lr"], n / train_seconds,
                               time.perf_counter() - t0, _peak_mem_mb(device))
        history.append(metrics)
        improved = top1 > best_top1
        if improved:
            best_top1, best_epoch = top1, epoch
        if out_dir and dist.is_main:
            _save_weights(eval_model, out_dir, LAST_WEIGHTS)
            if improved:
                _copy_weights(out_dir, LAST_WEIGHTS, BEST_WEIGHTS)
            save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": base.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": get_rng_state(), "history": [m.to_dict() for m in history],
                "best_top1": best_top1, "best_epoch": best_epoch, "config": cfg.to_dict(),
                "data": _data_record(data)})
            write_csv(os.path.join(out_dir, "metrics.csv"), history)
        if cfg.progress and dist.is_main:
            print(metrics.line(), flush=True)
        dist.barrier()  # nobody starts the next epoch while rank 0 is still writing
        keep_going = True if callback is None else callback(metrics) is not False
        flag = dist.all_sum(torch.tensor([0.0 if keep_going else 1.0], device=device))
        if flag.item() > 0 and epoch < cfg.epochs:
            stopped = True
            break
    return Result(eval_model, history, best_top1, best_epoch, stopped, out_dir,
                  time.perf_counter() - start_time)


def _data_record(data: Data) -> dict[str, Any]:
    return {"spec": data.spec, "data_dir": data.data_dir, "input_size": list(data.input_size),
            "num_classes": data.num_classes, "train_subset": data.train_subset}


def _write_run_file(out_dir: str, data: Data, cfg: TrainConfig) -> None:
    """A human-readable record of the recipe (the checkpoint holds the same, for resume)."""
    atomic_write_text(os.path.join(out_dir, RUN_FILE), yaml.safe_dump(
        {"data": _data_record(data), "config": cfg.to_dict()}, sort_keys=False))
