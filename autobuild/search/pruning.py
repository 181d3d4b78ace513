"""Early stopping of weak trials in a multi-objective study.

Optuna's pruners need ``trial.report``, which raises in multi-objective studies. The rule
here compares a running trial with the other trials' learning curves at the same epoch:

    after ``warmup_epochs``, a trial stops at epoch e when at least ``min_dominators`` other
    trials (finished, or stopped themselves) *dominate it at epoch e*: their validation top-1
    at epoch e is at least this trial's plus ``margin`` percentage points, and none of their
    costs (the minimised objectives: MACs, params, FLOPs, latency, all known before training)
    is higher, one of the two strictly better.

A cheap trial with a low accuracy is therefore never stopped by expensive accurate ones:
it is only stopped by trials that are at least as cheap and more accurate at the same
point of training, i.e. ones that already make it look dominated. Single-objective studies
use Optuna's own median pruner instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Curve", "dominators_at"]


@dataclass(frozen=True)
class Curve:
    """A trial's validation top-1 per epoch and its (minimised) costs."""

    top1: Sequence[float]
    costs: Sequence[float]


def _dominates(other: Curve, mine: Curve, epoch: int, margin: float) -> bool:
    acc_other, acc_mine = other.top1[epoch - 1], mine.top1[epoch - 1]
    if acc_other < acc_mine + margin:
        return False
    if any(o > m for o, m in zip(other.costs, mine.costs, strict=True)):
        return False
    return acc_other > acc_mine or any(o < m for o, m in zip(other.costs, mine.costs,
                                                               strict=True))


def dominators_at(mine: Curve, others: Sequence[Curve], epoch: int, *, margin: float = 0.0
                  ) -> int:
    """How many of ``others`` (those that reached ``epoch``) dominate ``mine`` there."""
    return sum(1 for other in others
               if len(other.top1) >= epoch and _dominates(other, mine, epoch, margin))


def should_stop(mine: Curve, others: Sequence[Curve], epoch: int, settings: Any) -> bool:
    """The rule of the module docstring with a space's ``pruning`` settings."""
    if not settings.enabled or epoch <= settings.warmup_epochs:
        return False
    return dominators_at(mine, others, epoch, margin=settings.margin) >= settings.min_dominators
