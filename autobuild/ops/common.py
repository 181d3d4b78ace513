"""What every fused op needs: when to use it, and autocast handled by hand.

A custom Function's backward runs outside the forward's autocast region, so the ops cast
their inputs the way autocast would (conv/linear inputs to the autocast dtype) *before*
entering the Function, and run the Function with autocast off: forward and backward then
see the same dtypes, and autograd casts the gradients back through those casts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NoAutocast", "autocast_cast", "autocast_dtype", "bn_trains", "compiling",
           "fused_enabled", "fused_ok", "plain_ops", "single_backward"]

_FUSED = {"enabled": True}


@contextmanager
def plain_ops() -> Iterator[None]:
    """Run every family layer through plain autograd (no fused op) inside the block, e.g.
    for double backward (``create_graph=True``), which the fused ops do not support."""
    before = _FUSED["enabled"]
    _FUSED["enabled"] = False
    try:
        yield
    finally:
        _FUSED["enabled"] = before


def single_backward(backward: Callable) -> Callable:
    """Like ``once_differentiable``, but refuses double backward outright: with
    ``create_graph=True`` the gradient of a fused op would silently miss its own terms
    (once_differentiable only errs when the incoming gradient requires grad)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled() and not compiling():
            raise RuntimeError(
                f"{type(ctx).__name__.removesuffix('Backward')}: autobuild's fused training "
                "ops do not support double backward (create_graph=True); run the model "
                "inside `with autobuild.ops.plain_ops():` for plain autograd")
        return backward(ctx, *grads)

    return wrapper


def fused_ok(bn: nn.Module | None, *tensors: Tensor) -> bool:
    """Whether a fused training op applies: autograd records (one of ``tensors`` requires
    grad) and ``bn``, if given, is a plain batch norm in training mode (eval mode and
    no_grad run the plain modules)."""
    if not (_FUSED["enabled"] and torch.is_grad_enabled()) or (
            bn is not None and not bn_trains(bn)):
        return False
    if any(isinstance(t, fx.Proxy) for t in tensors):  # torch.fx traces the plain ops
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def fused_enabled() -> bool:
    """False inside :func:`plain_ops`."""
    return _FUSED["enabled"]


def bn_trains(bn: nn.Module) -> bool:
    """A plain batch norm in training mode (what the fused ops replicate)."""
    return isinstance(bn, _BatchNorm) and bn.training


def compiling() -> bool:
    """True while torch.compile traces: ``out=`` into non-contiguous views breaks its graph,
    so the ops take an equivalent out-of-place route then (eager keeps the in-place one)."""
    return torch.compiler.is_compiling()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype conv/linear run in under the active autocast, None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """What autocast does to a conv's or linear's inputs (float64 is left alone)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t
                 for t in tensors)


class NoAutocast:
    """Autocast off for ``device_type`` while the block runs (inputs already cast), or
    nothing when ``active`` is false."""

    def __init__(self, device_type: str, active: bool) -> None:
        self.ctx = torch.autocast(device_type, enabled=False) if active else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
