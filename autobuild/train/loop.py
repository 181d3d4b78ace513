"""The classification training loop: ``train(model, data, config, callback=...) -> Result``.

GPU first (AMP, channels_last, torch.compile, DDP), CPU always. Rank 0 writes the run
directory: ``plan.yaml``, ``weights.safetensors`` (best epoch), ``last.safetensors``,
``checkpoint.pt`` (resumable), ``metrics.csv`` and ``train.yaml``. What is not specific to
classification (placement, optimizer, schedule, checkpoints, callbacks) is
:class:`autobuild.train.session.Session`, shared with the detection loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from autobuild.errors import AutobuildError, brief
from autobuild.train.config import TrainConfig, check_new_recipe
from autobuild.train.data import Data, build_data
from autobuild.train.distributed import Dist
from autobuild.train.metrics import EpochMetrics
from autobuild.train.regularize import (
    Regularizers,
    auxiliary_loss,
    check_regularizers,
    cutout,
    regularizers,
    set_drop_path,
    settle,
)
from autobuild.train.runtime import (
    autocast,
    channels_last,
    check_finite,
    make_loader,
    peak_mem_mb,
    place_model,
)
from autobuild.train.session import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    Callback,
    DivergedError,
    Session,
    resolve_device,
)

__all__ = ["BEST_WEIGHTS", "LAST_WEIGHTS", "Callback", "DivergedError", "Result",
           "check_fits", "evaluate", "resolve_device", "train"]

#: A mean training loss (cross-entropy, plus any auxiliary tower's) over this many times
#: ln(classes), a uniform guess's loss, stops the run as diverged: logits off by thousands,
#: from which no run recovers.
EXPLODED_LOSS = 1000.0


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
    #: The first epoch this call trained (after a resume: the checkpoint's + 1); ``seconds``
    #: counts from it.
    first_epoch: int = 1

    @property
    def last(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device,
              dist: Dist, num_classes: int) -> tuple[float, float, float]:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    k = min(5, num_classes)
    mem = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=mem)
        y = y.to(device, non_blocking=True)
        with autocast(cfg, device):
            out = model(x)
        out = out.float()
        top = out.topk(k, dim=1).indices == y[:, None]
        sums += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum").double(),
                             top[:, 0].sum().double(), top.any(1).sum().double(),
                             torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    loss, top1, top5, n = dist.all_sum(sums).tolist()
    n = max(n, 1.0)
    return loss / n, 100 * top1 / n, 100 * top5 / n


def _inputs(config: Any, data: Any) -> tuple[TrainConfig, Data]:
    """The recipe and the data of :func:`train` / :func:`evaluate`, of the types they take."""
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        raise AutobuildError(f"config must be a TrainConfig (TrainConfig(epochs=...)), got "
                             f"{type(cfg).__name__}")
    data = build_data(data) if isinstance(data, str) else data
    if not isinstance(data, Data):
        raise AutobuildError(f"data must be a spec string or the Data build_data() returns, "
                             f"got {type(data).__name__}")
    return cfg, data


def evaluate(model: nn.Module, data: Data | str, config: TrainConfig | None = None
             ) -> dict[str, float]:
    """Val loss, top-1 and top-5 (%) of ``model`` on ``data``'s val split, and images/s."""
    cfg, data = _inputs(config, data)
    device = resolve_device(cfg.device)
    model = place_model(model, cfg, device)
    start = time.perf_counter()
    loss, top1, top5 = _evaluate(model, make_loader(data.val, cfg, device, Dist(), False), cfg,
                                 device, Dist(), data.num_classes)
    seconds = time.perf_counter() - start
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5, "images": len(data.val),
            "seconds": seconds, "images_per_s": len(data.val) / max(seconds, 1e-9)}


def check_fits(model: nn.Module, data: Data) -> None:
    """Fail in one line, before any training, when the model does not match the data (or
    its weights are not finite)."""
    check_finite(model)
    was = model.training
    model.eval()
    # On the model's own device: a search checks the network it is training on the GPU.
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *data.input_size, device=device))
    except RuntimeError as exc:
        raise AutobuildError(f"the model does not accept {data.name} images "
                             f"{'x'.join(map(str, data.input_size))}: "
                             f"{brief(exc)}") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AutobuildError(f"the model outputs {shape} for a batch of 2 but {data.name} has "
                             f"{data.num_classes} classes: rebuild it with --num-classes "
                             f"{data.num_classes}")


def train(model: nn.Module, data: Data | str, config: TrainConfig | None = None, *,
          callback: Callback | None = None, out_dir: str | None = None,
          resume: bool = False, check_recipe: bool = True) -> Result:
    """Train ``model`` on ``data`` with ``config``; see the module docstring for ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.pt`` (model, optimizer, scheduler,
    scaler, EMA, epoch, RNG state). Refusing to overwrite another run is the caller's job
    (:func:`autobuild.train.prepare_run_dir`). ``check_recipe=False`` skips the checks of a
    new recipe (:func:`~autobuild.train.config.check_new_recipe`): a search made them when
    it created the study, and a study made before a check existed continues as made.
    Raises :class:`DivergedError` on a non-finite training or validation loss, or an
    exploded training loss (the last good checkpoint is kept and ``train.yaml`` says why the
    run stopped).
    """
    cfg, data = _inputs(config, data)
    check_fits(model, data)
    check_regularizers(model, cfg, image_size=data.input_size[1:])
    if check_recipe and not resume:
        check_new_recipe(cfg)
    with regularizers(model, cfg) as reg:
        session = _run(model, data, cfg, reg, callback, out_dir, resume)
    settle(session.eval_model)  # the EMA copy, if any, was made from the training model
    best = session.best if math.isfinite(session.best) else 0.0
    return Result(session.eval_model, session.history, best, session.best_epoch,
                  session.stopped, out_dir, session.seconds, session.first_epoch)


def _run(model: nn.Module, data: Data, cfg: TrainConfig, reg: Regularizers,
         callback: Callback | None, out_dir: str | None, resume: bool) -> Session:
    session = Session(model, cfg, out_dir=out_dir, best_key="best_top1",
                      train_images=len(data.train))
    train_loader = make_loader(data.train, cfg, session.device, session.dist, True)
    val_loader = make_loader(data.val, cfg, session.device, session.dist, False)
    if len(train_loader) == 0:
        raise AutobuildError(f"{data.name} has too few training images for one batch")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # A finite loss can diverge too (an unnormalised residual stack doubling its activations
    # at every block reached 1e16): far above a uniform guess's ln(C) is no training.
    max_loss = EXPLODED_LOSS * math.log(max(data.num_classes, 2))
    with session:  # records how the run ended in train.yaml
        session.start(len(train_loader), resume=resume, metrics_cls=EpochMetrics,
                      data_record=_data_record(data))
        session.probe = lambda: ("classification", _first_batches(val_loader))
        for epoch in range(session.first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            set_drop_path(reg.drop_paths, cfg.drop_path, epoch, cfg.epochs)
            loss, acc, images = _train_epoch(session, train_loader, criterion, epoch, reg,
                                             max_loss)
            seconds = time.perf_counter() - t0
            val_loss, top1, top5 = _evaluate(session.model_to_evaluate(), val_loader, cfg,
                                             session.device, session.dist, data.num_classes)
            session.check_finite(epoch, **{"validation loss": val_loss})
            metrics = EpochMetrics(epoch, loss, acc, val_loss, top1, top5,
                                   session.opt.param_groups[0]["lr"], images / seconds,
                                   time.perf_counter() - t0, peak_mem_mb(session.device))
            if session.end_epoch(metrics, top1, callback):
                break
    return session


def _train_epoch(session: Session, loader: DataLoader, criterion: nn.Module,
                 epoch: int, reg: Regularizers, max_loss: float
                 ) -> tuple[float, float, float]:
    """One pass over the training data: (mean loss, accuracy %, images), over all ranks.
    Every ``log_interval`` steps the sums are synchronised, which is also where a
    non-finite loss, or a mean loss over ``max_loss``, stops the run. The loss includes
    the auxiliary towers' weighted losses."""
    device, mem, steps = session.device, session.memory_format, len(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    session.net.train()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, n, bad
    bar = session.progress_bar(epoch, steps)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):
        x = x.to(device, non_blocking=True, memory_format=mem)
        y = y.to(device, non_blocking=True)
        x = cutout(x, session.cfg.cutout)
        with session.autocast():
            out = session.net(x)
            loss = criterion(out.float(), y)
            aux = auxiliary_loss(reg.heads, criterion, y, reg.aux_weight)
            if aux is not None:
                loss = loss + aux
        session.step(loss)
        # Accumulate on the device: no host sync per step (it would stall the GPU).
        d = loss.detach().double()
        sums += torch.stack([d * len(y), (out.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), device=device, dtype=torch.float64),
                             (~torch.isfinite(d)).double()])
        if i % session.cfg.log_interval == 0 or i == steps:
            tot = session.sync(sums, epoch, i, bar, max_loss)
            if bar is not None:
                bar.set_postfix(loss=f"{tot[0] / tot[2]:.3f}", acc=f"{100 * tot[1] / tot[2]:.1f}%",
                                img_s=f"{tot[2] / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    loss_sum, correct, n, _ = session.dist.all_sum(sums).tolist()
    return loss_sum / n, 100 * correct / n, n


def _first_batches(loader: DataLoader, n: int = 1) -> list[Any]:
    """The first ``n`` validation batches (TensorBoard's activation histograms)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _data_record(data: Data) -> dict[str, Any]:
    return {"spec": data.spec, "data_dir": data.data_dir, "input_size": list(data.input_size),
            "num_classes": data.num_classes, "classes": list(data.classes),
            "train_subset": data.train_subset}
