"""PyTorch's training-mode batch norm, in pieces a ``torch.autograd.Function`` can own.

:func:`bn_train_args` mirrors ``nn.BatchNorm*.forward`` (num_batches_tracked, momentum or
the cumulative average, ``track_running_stats``) so that :func:`bn_forward` — the native
kernel ``torch.native_batch_norm`` — updates the running statistics exactly as the module
would, once per forward. :func:`bn_backward` is the native backward kernel; it needs the
batch norm's input, the saved mean and the saved inverse std, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_backward", "bn_forward", "bn_normalize", "bn_train_args"]


def bn_train_args(bn: _BatchNorm, size: Sequence[int]
                  ) -> tuple[Tensor | None, Tensor | None, float]:
    """(running_mean, running_var, momentum) as ``bn.forward`` passes them to
    ``F.batch_norm`` in training mode for an input of shape ``size``, incrementing
    ``num_batches_tracked`` as it does."""
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {tuple(size)}")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    if not bn.track_running_stats:
        return None, None, momentum
    return bn.running_mean, bn.running_var, momentum


def bn_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd); updates the running statistics in place."""
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                   eps)


def bn_normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                 invstd: Tensor, eps: float) -> Tensor:
    """The batch norm's output recomputed from its saved statistics: the native kernel in
    inference form, with var = invstd⁻² - eps (one pass over x, like the forward's
    normalisation; a broadcasting ``addcmul`` is about twice as slow on CPU)."""
    var = invstd.double().pow(-2).sub(eps).to(invstd.dtype)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def bn_backward(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                eps: float, mask: tuple[bool, bool, bool]
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias) of training-mode batch norm (native kernel)."""
    mask = (mask[0], mask[1] and weight is not None, mask[2] and weight is not None)
    if not any(mask):
        return None, None, None
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, invstd, True, eps, list(mask))
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)
