"""What every training run does around its task's own steps, shared by the classification
loop (:mod:`autobuild.train.loop`) and the detection loop (:mod:`autobuild.train.detection`).

A :class:`Session` places the model (device, channels_last, SyncBN, DDP, compile), seeds the
run, builds the optimizer, schedule, AMP scaler and EMA, restores a checkpoint, takes the
optimizer step (clipping, AMP, EMA), detects divergence (a non-finite training loss or
validation metric), and at the end of every epoch writes the run directory (rank 0 only),
logs to TensorBoard and asks the callback whether to go on. Used as a context manager
around the epochs, it records how the run ended in ``train.yaml`` (finished, stopped,
diverged, failed or interrupted, with the reason). The task supplies the batches, the loss
and the validation metric. The pieces that do not depend on a run (loaders, the lr
schedule, autocast) are :mod:`autobuild.train.runtime`'s.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from autobuild.errors import AutobuildError, brief, without_type
from autobuild.files import atomic_copy
from autobuild.io import PLAN_FILE, save_plan, save_weights
from autobuild.optim import param_groups
from autobuild.rewrite import plan_of, record_of, set_record
from autobuild.rewrite.record import without_dropped
from autobuild.train.checkpoint import (
    CHECKPOINT_FILE,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from autobuild.train.config import TrainConfig, check_resume
from autobuild.train.devices import resolve_device
from autobuild.train.distributed import init_distributed
from autobuild.train.metrics import write_csv
from autobuild.train.rundir import resume_history, write_run_record
from autobuild.train.runtime import autocast as recipe_autocast
from autobuild.train.runtime import channels_last, lr_factor, place_model

__all__ = ["BEST_WEIGHTS", "LAST_WEIGHTS", "Callback", "DivergedError", "Session",
           "resolve_device"]

BEST_WEIGHTS = "weights.safetensors"  # what autobuild.load() and `evaluate` read
LAST_WEIGHTS = "last.safetensors"

#: Called after every epoch (on every rank, with the same metrics); returning False stops
#: the run after that epoch (pruning by a search).
Callback = Callable[[Any], "bool | None"]


class DivergedError(AutobuildError):
    """The loss became NaN or infinite: the run stops, the CLI exits with code 3."""

    exit_code = 3


def _save_weights(model: nn.Module, out: str, name: str) -> None:
    # No model copy: safetensors moves CUDA tensors to the CPU itself, and save_weights
    # writes channels_last weights contiguously (force_contiguous).
    save_weights(model, os.path.join(out, name))


def _copy_weights(out: str, src: str, dst: str) -> None:
    """The best epoch is the epoch just saved: copy its file rather than serialise again."""
    atomic_copy(os.path.join(out, src), os.path.join(out, dst))


class Session:
    """One training run's shared machinery (see the module docstring).

    ``best_key`` names the validation score that picks the best epoch (higher is better)
    and is how the checkpoint stores it (``best_top1``, ``best_map``). ``compile_module``
    names the submodule ``--compile`` compiles in place (default: the whole model);
    ``clip_table`` the per-family clipping of ``--clip-grad auto``; ``train_images`` the
    size of the training set, so that the default lr scales with the batch a step really
    sees (a --batch-size above the set's size is the whole set, not the nominal batch).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, out_dir: str | None = None,
                 best_key: str = "best_top1", compile_module: str | None = None,
                 clip_table: dict[str, float] | None = None,
                 train_images: int | None = None) -> None:
        if out_dir and plan_of(model) is None:
            raise AutobuildError("saving a run needs a model with a plan "
                                 "(autobuild.convert/load)")
        self.cfg, self.out_dir, self.best_key = cfg, out_dir, best_key
        self.start_time = time.perf_counter()
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = init_distributed(self.device)
        self._seed()
        plan = plan_of(model)
        families = {c.family for c in plan.conversions} if plan else set()
        self.max_norm = cfg.max_grad_norm(families, clip_table)
        self._place(model, compile_module)
        self._optimizer(train_images)
        self.memory_format = (torch.channels_last if channels_last(cfg, self.device)
                              else torch.contiguous_format)
        self.history: list[Any] = []
        self.first_epoch, self.best, self.best_epoch = 1, -math.inf, 0
        self.stopped = False
        self.ema: Any = None
        self.tensorboard: Any = None
        self.recording = False  # whether this process writes train.yaml (after start())
        self.resumes: list[dict[str, Any]] = []  # train.yaml's history of resumes
        #: Set by the task loop: returns a few validation batches for TensorBoard histograms.
        self.probe: Callable[[], tuple[str, Sequence[Any]]] | None = None

    def _seed(self) -> None:
        cfg, rank = self.cfg, self.dist.rank
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)  # ranks augment differently; DDP syncs weights
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _place(self, model: nn.Module, compile_module: str | None) -> None:
        """``base`` (the module saved and evaluated) on the device; ``net`` (what trains)
        wrapped in DDP and compiled as the recipe says."""
        cfg = self.cfg
        model = place_model(model, cfg, self.device)
        if cfg.sync_bn and self.device.type != "cuda":
            raise AutobuildError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only)")
        if self.dist.enabled and cfg.sync_bn:
            record = record_of(model)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if record is not None:
                set_record(model, record)
        self.base = model
        self.net: nn.Module = model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile and compile_module:
            # In place (nn.Module.compile): the state_dict keys stay those of the plan.
            self.base.get_submodule(compile_module).compile()
        elif cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]

    def _optimizer(self, train_images: int | None) -> None:
        cfg = self.cfg
        step_batch = cfg.batch_size  # images per process and step, as the loader makes them
        if train_images is not None:
            step_batch = max(1, min(step_batch, train_images // self.dist.world_size))
        lr = cfg.peak_lr(step_batch)
        groups = param_groups(self.base, cfg.decay(), lr=lr)
        if cfg.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=lr, momentum=cfg.momentum,
                nesterov=cfg.nesterov and cfg.momentum > 0)
        else:
            self.opt = torch.optim.AdamW(groups, lr=lr)

    # ---- set-up -------------------------------------------------------------------------
    def start(self, steps_per_epoch: int, *, resume: bool, metrics_cls: Any,
              data_record: dict[str, Any]) -> None:
        """Build the schedule, scaler and EMA; restore ``out_dir``'s checkpoint if
        ``resume``; record the recipe; open the TensorBoard log."""
        cfg = self.cfg
        self.data_record = data_record
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                       lr_factor(cfg, steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.amp and cfg.amp_dtype == "fp16")
        if cfg.ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.base, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                     use_buffers=True)
        if resume:
            self._restore(metrics_cls)
        if cfg.tensorboard and self.dist.is_main:  # (a bad log directory writes nothing)
            from autobuild.train.tensorboard import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(cfg.tensorboard)
        if self.out_dir and self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            save_plan(plan_of(self.base), os.path.join(self.out_dir, PLAN_FILE))
            self.recording = True
            self.record("running")

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT_FILE) if self.out_dir else ""

    def _restore(self, metrics_cls: Any) -> None:
        if not self.out_dir:
            raise AutobuildError("resume needs the run directory (out_dir)")
        state = load_checkpoint(self.ckpt_path)
        # The optimizer's state restores the hyper-parameters it was saved with; the recipe
        # given now (`train --resume RUN --lr 0.01`) is the one that must apply from here on.
        recipe = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        check_resume(self.cfg, int(state["epoch"]), state.get("config") or {})
        try:
            self.base.load_state_dict(without_dropped(self.base, state["model"]))
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self._apply_recipe(recipe)
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            self.history = [metrics_cls.from_dict(m) for m in state["history"]]
            self.best = float(state[self.best_key])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise AutobuildError(f"checkpoint {self.ckpt_path!r} does not match this "
                                 f"model/recipe: {brief(exc)}") from exc
        self.resumes = resume_history(self.out_dir, self.cfg.to_dict(), self.data_record,
                                      int(state["epoch"]))
        self.first_epoch = int(state["epoch"]) + 1
        self.best_epoch = int(state["best_epoch"])
        set_rng_state(state["rng"])

    def _apply_recipe(self, recipe: list[dict[str, Any]]) -> None:
        """Put the current recipe's hyper-parameters back after a restore; the learning rate
        is the schedule's value at the restored step, as ``LambdaLR`` computes it."""
        for group, values in zip(self.opt.param_groups, recipe, strict=True):
            group.update(values)
        self.sched.base_lrs = [values["initial_lr"] for values in recipe]
        for group, base, factor in zip(self.opt.param_groups, self.sched.base_lrs,
                                       self.sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.sched.last_epoch)

    # ---- per step -----------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.base

    def autocast(self) -> Any:
        return recipe_autocast(self.cfg, self.device)

    def progress_bar(self, epoch: int, steps: int) -> Any:
        if not (self.cfg.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch}/{self.cfg.epochs}", unit="batch",
                    leave=False, dynamic_ncols=True)

    def step(self, loss: torch.Tensor) -> None:
        """Backward and optimizer step (AMP scaling, clipping, schedule, EMA)."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.max_norm is not None:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.base.parameters(), self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.base)

    def record(self, status: str, reason: str | None = None) -> None:
        """Write ``train.yaml``: the data, the recipe and how the run stands (rank 0)."""
        if self.recording:
            write_run_record(self.out_dir, {  # type: ignore[arg-type]
                "status": status, "reason": reason,
                "epochs_done": self.history[-1].epoch if self.history else 0,
                "data": self.data_record, "config": self.cfg.to_dict(),
                "resumes": self.resumes})

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Record how the run ended (the last good checkpoint stays what it was)."""
        try:
            if exc is None:
                self.record("stopped" if self.stopped else "finished")
            elif isinstance(exc, DivergedError):
                self.record("diverged", str(exc))
            elif isinstance(exc, KeyboardInterrupt):
                self.record("interrupted", type(exc).__name__)
            else:
                last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                # A data-loader worker's error arrives as its traceback, whose last line
                # names the type again ("autobuild.errors.AutobuildError: cannot decode").
                message = without_type(last)
                last = last if message is None else message
                self.record("failed", f"{type(exc).__name__}: {last}"[:500])
        finally:
            self.close()

    def _what_is_kept(self) -> str:
        """The end of a divergence message: what the run directory still holds."""
        if not self.out_dir:
            return ""
        if not self.history:  # diverged before its first checkpoint
            return "; no epoch finished, so there is no checkpoint to resume (--force starts over)"
        return (f"; the last good checkpoint (epoch {self.history[-1].epoch}) is kept "
                f"(train --resume continues from it)")

    def check_finite(self, epoch: int, **values: float) -> None:
        """A non-finite validation loss (or metric) is a divergence as much as a non-finite
        training loss: the epoch is not saved, the last good checkpoint stays."""
        bad = [f"{k} = {v}" for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(f"training diverged: non-finite {', '.join(bad)} in epoch "
                                f"{epoch}; lower --lr or keep --clip-grad (e.g. 0.5)"
                                f"{self._what_is_kept()}")

    def sync(self, sums: torch.Tensor, epoch: int, step: int, bar: Any,
             max_loss: float | None = None) -> list[float]:
        """Sum ``sums`` (loss sum, ..., count, non-finite count) over ranks. A non-finite
        loss, or a mean loss above ``max_loss``, stops the run. Every rank calls this at the
        same steps and decides on the summed values, so no rank is left waiting."""
        tot = self.dist.all_sum(sums.clone()).tolist()
        mean = tot[0] / max(tot[-2], 1.0)
        why = ("non-finite loss" if tot[-1] > 0 else f"mean loss {mean:.3g}, over {max_loss:.0f}"
               if max_loss is not None and mean > max_loss else None)
        if why is not None:
            if bar is not None:
                bar.close()
            # (bf16 is advice for fp16 AMP only: its range is what overflows there)
            fp16 = ", or use --amp-dtype bf16" if self.cfg.amp and \
                self.cfg.amp_dtype == "fp16" else ""
            raise DivergedError(
                f"training diverged: {why} in epoch {epoch} (step {step}); "
                f"lower --lr or keep --clip-grad (e.g. 0.5){fp16}{self._what_is_kept()}")
        return tot

    # ---- per epoch ----------------------------------------------------------------------
    def model_to_evaluate(self) -> nn.Module:
        """The model to validate (the EMA, if any), the same on every rank: DDP keeps the
        weights equal, but each rank's last forward updated its own BN statistics, and
        rank 0's are the ones saved."""
        model = self.eval_model
        self.dist.broadcast_tensors([b for b in model.buffers() if b.is_floating_point()])
        return model

    def end_epoch(self, metrics: Any, score: float, callback: Callback | None) -> bool:
        """Record the epoch; returns True when the run should stop after it."""
        self.history.append(metrics)
        improved = score > self.best
        if improved:
            self.best, self.best_epoch = score, metrics.epoch
        out = self.out_dir
        if out and self.dist.is_main:
            _save_weights(self.eval_model, out, LAST_WEIGHTS)
            if improved:
                _copy_weights(out, LAST_WEIGHTS, BEST_WEIGHTS)
            save_checkpoint(self.ckpt_path, {
                "epoch": metrics.epoch, "model": self.base.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": get_rng_state(), "history": [m.to_dict() for m in self.history],
                self.best_key: self.best, "best_epoch": self.best_epoch,
                "config": self.cfg.to_dict(), "data": self.data_record})
            write_csv(os.path.join(out, "metrics.csv"), self.history)
            self.record("running")
        if self.tensorboard is not None:
            self._log_tensorboard(metrics)
        if self.cfg.progress and self.dist.is_main:  # stdout is the command's result
            print(metrics.line(), file=sys.stderr, flush=True)
        self.dist.barrier()  # nobody starts the next epoch while rank 0 is still writing
        keep_going = True if callback is None else callback(metrics) is not False
        flag = self.dist.all_sum(torch.tensor([0.0 if keep_going else 1.0],
                                              device=self.device))
        if flag.item() > 0 and metrics.epoch < self.cfg.epochs:
            self.stopped = True
        return self.stopped

    def _log_tensorboard(self, metrics: Any) -> None:
        self.tensorboard.scalars(metrics)
        epoch = metrics.epoch
        if self.probe is not None and (epoch % self.cfg.tensorboard_every == 0
                                       or epoch == self.cfg.epochs):
            # Iterating a loader draws from the global RNG: logging must not change the run.
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                task, batches = self.probe()
                self.tensorboard.histograms(self.eval_model, task, batches, epoch,
                                            self.device)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start_time
