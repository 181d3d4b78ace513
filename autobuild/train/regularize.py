"""The DARTS/PDE-Global CIFAR recipe's regularisers: cutout on the training batch, a drop
path rate raised over the run, and auxiliary heads' losses.

Models take part by duck typing (training knows no model zoo): a module whose class sets
``drop_path_scheduled = True`` has its ``drop_prob`` set each epoch; a module with an
``auxiliary_logits`` attribute (a Tensor after a training forward) adds
``aux_weight`` x its loss (``autobuild.models.darts`` builds both)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autobuild.errors import InvalidValue
from autobuild.train.config import TrainConfig

__all__ = ["auxiliary_heads", "auxiliary_loss", "check_regularizers", "cutout",
           "drop_path_modules", "set_drop_path"]


def cutout(x: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """DeVries & Taylor's cutout, one hole per image: a ``length`` x ``length`` square (cut
    at the border) around a uniformly drawn centre is set to 0, after normalisation (as
    PDE-Global's ``-ct`` and DARTS's ``--cutout`` do). ``x`` is an (N, C, H, W) batch."""
    if length <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(h, (n, 1, 1), generator=generator, device="cpu").to(x.device)
    cx = torch.randint(w, (n, 1, 1), generator=generator, device="cpu").to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = length // 2  # the reference: rows [cy - half, cy + half), clipped
    hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return x.masked_fill(hole.unsqueeze(1), 0)


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
    return weight * torch.stack(losses).sum() if losses and weight > 0 else None


def check_regularizers(model: nn.Module, cfg: TrainConfig, *, detection: bool = False) -> None:
    """Refuse, before any work, a regulariser the model or task cannot take: cutout and drop
    path on a detector, a drop path rate for a model without drop path."""
    if detection and (cfg.cutout or cfg.drop_path):
        flag = "cutout (--cutout)" if cfg.cutout else "drop_path (--drop-path)"
        raise InvalidValue(f"{flag} applies to classifiers; the detection recipe has its own "
                           "augmentation (--augment)")
    if cfg.drop_path > 0 and not drop_path_modules(model):
        raise InvalidValue(f"drop_path (--drop-path) {cfg.drop_path}: this model has no drop "
                           "path to schedule (DARTS cells have: cifar_darts_v2, "
                           "cifar_darts_v2_aux and their conversions); leave it at 0")
