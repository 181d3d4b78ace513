"""Parameters, MACs and FLOPs of a model, in total and per module (see
:mod:`autobuild.rewrite.cost` for what is counted and how)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from autobuild.errors import AutobuildError, InvalidType, brief, check_input_size
from autobuild.rewrite.cost import Counts, count_module, param_count
from autobuild.rewrite.record import plan_of

__all__ = ["Counts", "count", "param_count"]


def count(model: nn.Module, input_size: Sequence[int] | None = None, *,
          batch_size: int = 1) -> Counts:
    """Count ``model`` on one input of ``input_size`` (C, H, W) in eval mode.

    Per-module numbers are inclusive of submodules; a module called several times adds up.
    ``input_size`` defaults to the size recorded in the model's plan. ``batch_size`` is
    accepted for compatibility; counts are per image.
    """
    if not isinstance(model, nn.Module):
        hint = (f" (a baseline by name is counted by autobuild.analyze({model!r}).counts)"
                if isinstance(model, str) else "")
        raise InvalidType(f"count() takes an nn.Module, got {type(model).__name__}{hint}")
    if input_size is None:
        plan = plan_of(model)
        if plan is None or plan.input_size is None:
            raise AutobuildError("count() needs input_size for a model without a plan")
        input_size = plan.input_size
    input_size = check_input_size(input_size)
    try:
        return count_module(model, input_size)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise AutobuildError(f"count(): the model fails on an input of size "
                             f"{tuple(input_size)} (C, H, W): {type(exc).__name__}: "
                             f"{brief(exc)}") from exc
