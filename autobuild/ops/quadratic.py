"""The quadratic ``ours`` neuron, BN_a(W_a x) ⊙ BN_b(W_b x) + BN_c(W_c x), as autograd
Functions. The three branches are one conv (or linear) with 3C outputs and one batch norm
over them; a branch is a channel slice of that output ([a|b|c] per conv group).

``bn_product`` (the default, ``memory=default``): batch norm + product in one Function.
  Plain autograd keeps the conv output y (for the batch norm) *and* the normalised
  [A|B|C] (for the product); this keeps y and the statistics and recomputes A and B in
  backward (one pass over y). Same kernels forward, so the same outputs.

``quadratic_conv_save`` / ``quadratic_linear_save`` (``memory=save``): the whole layer in
  one Function that keeps only its input, the weights and the batch-norm statistics; the
  backward recomputes y = W·x (one more conv), A and B, then runs the native batch-norm
  and convolution backward kernels. The running statistics are updated once, in forward
  (``torch.utils.checkpoint`` would update them again when it re-runs the forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from autobuild.ops.batchnorm import bn_backward, bn_forward, bn_normalize, bn_train_args
from autobuild.ops.common import (
    NoAutocast,
    autocast_cast,
    autocast_dtype,
    compiling,
    single_backward,
)

__all__ = ["bn_product", "branches", "ours_conv_train", "ours_linear_train",
           "quadratic_conv_save", "quadratic_linear_save"]


def branches(t: Tensor, n: int, groups: int) -> tuple[Tensor, ...]:
    """The n branches of ``t`` along dim 1 (each conv group holds its branches side by
    side, [a|b|c] per group): views for one group, copies for several (read them only)."""
    if groups == 1:
        return t.chunk(n, 1)
    return tuple(p.flatten(1, 2) for p in t.unflatten(1, (groups, n, -1)).unbind(2))


def _split(t: Tensor, n: int, groups: int) -> tuple[Tensor, ...]:
    """The branches as (N, groups, C/groups, ...) views, writable."""
    return t.unflatten(1, (groups, n, -1)).unbind(2)


def _product(z: Tensor, groups: int) -> Tensor:
    if groups == 1:
        a, b, c = z.chunk(3, 1)
        return torch.addcmul(c, a, b)
    a, b, c = _split(z, 3, groups)
    return torch.addcmul(c, a, b).flatten(1, 2)


def _product_bn_backward(grad: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
                         mean: Tensor, invstd: Tensor, eps: float, groups: int,
                         mask: tuple[bool, bool, bool]
                         ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of out = A ⊙ B + C, [A|B|C] = BN(y), from y and the batch statistics."""
    z = bn_normalize(y, weight, bias, mean, invstd, eps)
    a, b, _ = _split(z, 3, groups)
    grad = grad.to(y.dtype).unflatten(1, (groups, -1))
    if compiling():
        gz = torch.stack([grad * b, grad * a, grad], 2).flatten(1, 3)
    else:  # written in place: no concatenation pass
        gz = torch.empty_like(y)
        ga, gb, gc = _split(gz, 3, groups)
        torch.mul(grad, b, out=ga)
        torch.mul(grad, a, out=gb)
        gc.copy_(grad)
    del z, a, b
    return bn_backward(gz, y, weight, mean, invstd, eps, mask)


class _BNProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, y: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float, groups: int) -> Tensor:
        z, mean, invstd = bn_forward(y, weight, bias, running_mean, running_var, momentum, eps)
        out = _product(z, groups)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.eps, ctx.groups = eps, groups
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, weight, bias, mean, invstd = ctx.saved_tensors
        gy, gw, gb = _product_bn_backward(grad, y, weight, bias, mean, invstd, ctx.eps,
                                          ctx.groups, tuple(ctx.needs_input_grad[:3]))
        return gy, gw, gb, None, None, None, None, None


def bn_product(y: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
               eps: float, groups: int = 1) -> Tensor:
    """A ⊙ B + C with [A|B|C] = training-mode BN(y) along dim 1 (running stats updated)."""
    return _BNProduct.apply(y, weight, bias, running_mean, running_var, momentum, eps, groups)


class _QuadraticConvSave(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
                bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int) -> Tensor:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        z, mean, invstd = bn_forward(y, bn_weight, bn_bias, running_mean, running_var,
                                     momentum, eps)
        del y
        out = _product(z, groups)
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, mean, invstd)
        ctx.conf = (eps, list(stride), list(padding), list(dilation), groups)
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        eps, stride, padding, dilation, groups = ctx.conf
        need = ctx.needs_input_grad
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        gy, gbw, gbb = _product_bn_backward(grad, y, bn_weight, bn_bias, mean, invstd, eps,
                                            groups, (any(need[:3]), need[3], need[4]))
        del y
        gx = gw = gb = None
        if any(need[:3]):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, [weight.shape[0]] if bias is not None else None, stride,
                padding, dilation, False, [0, 0], groups,
                [need[0], need[1], need[2] and bias is not None])
        return (gx if need[0] else None, gw if need[1] else None,
                gb if need[2] and bias is not None else None, gbw, gbb,
                None, None, None, None, None, None, None, None)


def quadratic_conv_save(x: Tensor, weight: Tensor, bias: Tensor | None,
                        bn_weight: Tensor | None, bn_bias: Tensor | None,
                        running_mean: Tensor | None, running_var: Tensor | None,
                        momentum: float, eps: float, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``ours`` on a conv, keeping only x, the weights and the batch statistics."""
    return _QuadraticConvSave.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
                                    running_var, momentum, eps, stride, padding, dilation,
                                    groups)


class _QuadraticLinearSave(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
                bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:
        y = F.linear(x, weight, bias).reshape(-1, weight.shape[0])
        z, mean, invstd = bn_forward(y, bn_weight, bn_bias, running_mean, running_var,
                                     momentum, eps)
        del y
        out = _product(z, 1)
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, mean, invstd)
        ctx.eps = eps
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        gy, gbw, gbb = _product_bn_backward(grad.reshape(-1, grad.shape[-1]), y, bn_weight,
                                            bn_bias, mean, invstd, ctx.eps, 1,
                                            (any(need[:3]), need[3], need[4]))
        del y
        gx = (gy @ weight).reshape(x.shape) if need[0] else None
        gw = gy.t() @ x2 if need[1] else None
        gb = gy.sum(0) if need[2] and bias is not None else None
        return gx, gw, gb, gbw, gbb, None, None, None, None


def quadratic_linear_save(x: Tensor, weight: Tensor, bias: Tensor | None,
                          bn_weight: Tensor | None, bn_bias: Tensor | None,
                          running_mean: Tensor | None, running_var: Tensor | None,
                          momentum: float, eps: float) -> Tensor:
    """``ours`` on a linear layer (any leading dims; BN over all of them), keeping only x,
    the weights and the batch statistics."""
    return _QuadraticLinearSave.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
                                      running_var, momentum, eps)


def ours_conv_train(layer: nn.Module, x: Tensor, padding: Sequence[int] | None) -> Tensor:
    """The training forward of a QuadraticConv2d of type ``ours`` (``layer.memory``:
    "default" or "save"; ``padding`` numeric, or None where a string padding has no
    symmetric equivalent, which runs the default)."""
    bn = layer.bn
    dev = x.device.type
    dtype = autocast_dtype(dev)
    if layer.memory == "save" and padding is not None:
        size = (x.shape[0], 1, *((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            x.shape[-2:], padding, layer.dilation, layer.kernel_size, layer.stride,
            strict=True)))
        rm, rv, momentum = bn_train_args(bn, size)
        x, weight, bias = autocast_cast(dtype, x, layer.weight, layer.bias)
        with NoAutocast(dev, dtype is not None):
            return quadratic_conv_save(x, weight, bias, bn.weight, bn.bias, rm, rv, momentum,
                                       bn.eps, layer.stride, padding, layer.dilation,
                                       layer.groups)
    y = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                 layer.groups)
    rm, rv, momentum = bn_train_args(bn, y.shape)
    with NoAutocast(dev, dtype is not None):
        return bn_product(y, bn.weight, bn.bias, rm, rv, momentum, bn.eps, layer.groups)


def ours_linear_train(layer: nn.Module, x: Tensor) -> Tensor:
    """The training forward of a QuadraticLinear of type ``ours`` (any leading dims)."""
    bn = layer.bn
    dev = x.device.type
    dtype = autocast_dtype(dev)
    size = (x.numel() // max(x.shape[-1], 1), 3 * layer.out_channels)
    rm, rv, momentum = bn_train_args(bn, size)
    if layer.memory == "save":
        x, weight, bias = autocast_cast(dtype, x, layer.weight, layer.bias)
        with NoAutocast(dev, dtype is not None):
            return quadratic_linear_save(x, weight, bias, bn.weight, bn.bias, rm, rv,
                                         momentum, bn.eps)
    y = F.linear(x, layer.weight, layer.bias)
    with NoAutocast(dev, dtype is not None):
        out = bn_product(y.reshape(-1, y.shape[-1]), bn.weight, bn.bias, rm, rv, momentum,
                         bn.eps)
    return out.reshape(*y.shape[:-1], layer.out_channels)
