"""The DARTS/PDE-Global CIFAR recipe's regularisers: cutout on the training batch, a drop
path rate raised over the run, and auxiliary towers' losses.

Models take part by duck typing (training knows no model zoo): a module whose class sets
``drop_path_scheduled = True`` has its ``drop_prob`` set each epoch; a module with an
``auxiliary_logits`` attribute is an auxiliary tower: while training sets its ``collect``,
a training forward leaves its logits there, and ``aux_weight`` x their loss joins the loss
(``autobuild.models.darts`` builds both)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autobuild.errors import InvalidValue
from autobuild.train.config import TrainConfig, flag_of

__all__ = ["DEFAULT_AUX_WEIGHT", "Regularizers", "auxiliary_heads", "auxiliary_loss",
           "check_regularizers", "cutout", "drop_path_modules", "regularizers",
           "set_drop_path", "settle"]

#: DARTS's weight of the auxiliary tower's loss (the default for a model with a tower).
DEFAULT_AUX_WEIGHT = 0.4


def cutout(x: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """DeVries & Taylor's cutout, one hole per image, in place: a ``length`` x ``length``
    square (cut at the border) around a uniformly drawn centre is set to 0, after
    normalisation (as PDE-Global's ``-ct`` and DARTS's ``--cutout`` do). ``x`` is an
    (N, C, H, W) batch; its memory format is kept."""
    if length <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(h, (n, 1, 1), generator=generator, device="cpu").to(x.device)
    cx = torch.randint(w, (n, 1, 1), generator=generator, device="cpu").to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = length // 2  # the reference: rows [cy - half, cy + half), clipped
    hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return x.masked_fill_(hole.unsqueeze(1), 0)


def drop_path_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(type(m), "drop_path_scheduled", False)]


def set_drop_path(modules: list[nn.Module], rate: float, epoch: int, epochs: int) -> None:
    """DARTS's schedule: ``rate`` x (epoch - 1) / epochs in the 1-based ``epoch`` (0 in the
    first epoch, just under ``rate`` in the last)."""
    for m in modules:
        m.drop_prob = rate * (epoch - 1) / epochs


def auxiliary_heads(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "auxiliary_logits")]


def auxiliary_loss(heads: list[nn.Module], criterion: nn.Module, y: Tensor,
                   weight: float) -> Tensor | None:
    """``weight`` x the heads' losses from this forward (None without any), and the heads
    let go of their logits (and so of the graph behind them)."""
    losses = []
    for head in heads:
        logits, head.auxiliary_logits = head.auxiliary_logits, None
        if logits is not None:
            losses.append(criterion(logits.float(), y))
    return weight * torch.stack(losses).sum() if losses else None


def check_regularizers(model: nn.Module | None, cfg: TrainConfig, *, detection: bool = False,
                       key: str = "--", image_size: tuple[int, int] | None = None) -> None:
    """Refuse, before any work, a regulariser the task, ``model`` or images cannot take
    (without a model, what the task alone decides). ``key`` names the settings: ``--`` as
    flags, ``budget.`` as a search space's keys."""

    def name(field: str) -> str:
        return f"{field} ({flag_of(field)})" if key == "--" else f"{key}{field}"

    if detection and cfg.cutout:
        raise InvalidValue(f"{name('cutout')} {cfg.cutout}: cutout is for classifiers; the "
                           "detection recipe has its own augmentation (--augment)")
    if detection and cfg.label_smoothing:
        raise InvalidValue(f"{name('label_smoothing')} {cfg.label_smoothing}: label smoothing "
                           "is for classifiers; the SSD loss (torchvision's) has none")
    if detection and cfg.drop_path:
        raise InvalidValue(f"{name('drop_path')} {cfg.drop_path}: drop path is for DARTS "
                           "cells (cifar_darts_v2, cifar_darts_v2_aux); a detector has none")
    if image_size is not None and cfg.cutout > max(image_size):
        raise InvalidValue(f"{name('cutout')} {cfg.cutout}: larger than the "
                           f"{image_size[0]}x{image_size[1]} images, it would blank them "
                           f"whole; at most {max(image_size)} (DARTS uses 16 on 32x32)")
    if model is None:
        return
    if cfg.drop_path > 0 and not drop_path_modules(model):
        raise InvalidValue(f"{name('drop_path')} {cfg.drop_path}: this model has no drop path "
                           "to schedule (DARTS cells have: cifar_darts_v2, cifar_darts_v2_aux "
                           "and their conversions); leave it at 0")
    if cfg.aux_weight and not auxiliary_heads(model):
        raise InvalidValue(f"{name('aux_weight')} {cfg.aux_weight}: this model has no "
                           "auxiliary tower (cifar_darts_v2_aux has); leave it out")


@dataclass
class Regularizers:
    """What the training loop applies: the scheduled drop paths, the auxiliary towers that
    collect their logits, and the weight of their loss."""

    drop_paths: list[nn.Module]
    heads: list[nn.Module]
    aux_weight: float


@contextlib.contextmanager
def regularizers(model: nn.Module, cfg: TrainConfig) -> Iterator[Regularizers]:
    """For the length of a run, towers collect their logits. Their loss joins with its
    weight, also when that is 0: the tower then runs for nothing, but DDP gets the
    gradients it waits for (zeros) and the optimizer's parameters stay the same whatever the
    weight (a run resumes with another one). Afterwards (:func:`settle`) the towers stop
    collecting and drop path rates are back to 0."""
    heads = auxiliary_heads(model)
    for h in heads:
        h.collect = True
    try:
        yield Regularizers(drop_path_modules(model), heads,
                           DEFAULT_AUX_WEIGHT if cfg.aux_weight is None else cfg.aux_weight)
    finally:
        settle(model)


def settle(model: nn.Module) -> None:
    """A model after training (also its EMA copy, made during the run): towers idle and
    holding nothing, drop path rates 0."""
    for h in auxiliary_heads(model):
        h.collect, h.auxiliary_logits = False, None
    for m in drop_path_modules(model):
        m.drop_prob = 0.0
