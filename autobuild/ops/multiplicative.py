"""The QL block's (QLNet) batch-norm/product and batch-norm/1x1-conv pairs as Functions.

``bn_product`` — y = BN1(z), p = y[:, :w] ⊙ y[:, w:]: plain autograd keeps z (for BN1) and
  BN1's whole output (both halves, for the product). This keeps z and the statistics and
  recomputes BN1's output in backward (one pass), so the 2·w-channel normalised map is
  never kept. The halves are ``chunk`` views (slices copy nothing either way; ``chunk``
  is one op instead of two).

``bn_conv1x1`` — o = conv1x1(BN2(d)): plain autograd keeps d (for BN2) and BN2's output
  (for the conv's weight gradient). This keeps d and recomputes BN2's output in backward.

``ql_branch_save`` (``memory=save``) — the whole branch conv1 → BN1 → product → depthwise
  conv → BN2 → conv3 in one Function that keeps only the block input, the weights and the
  batch statistics, and recomputes the branch up to BN2's output in backward (one more
  conv1 and depthwise conv): a QL block then keeps about as much as the basic block it
  replaced, instead of ~4x (its 2·width-channel maps).

Running statistics are updated once, in forward, by the native kernel (as nn.BatchNorm2d).
"""

from __future__ import annotations

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

__all__ = ["bn_conv1x1", "bn_product", "ql_branch_save", "ql_branch_train"]


class _BNProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:
        y, mean, invstd = bn_forward(z, weight, bias, running_mean, running_var, momentum, eps)
        a, b = y.chunk(2, 1)
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        ctx.eps = eps
        return a * b

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        z, weight, bias, mean, invstd = ctx.saved_tensors
        y = bn_normalize(z, weight, bias, mean, invstd, ctx.eps)
        a, b = y.chunk(2, 1)
        grad = grad.to(y.dtype)
        if compiling():
            gy = torch.cat([grad * b, grad * a], 1)
        else:  # written in place: no concatenation pass
            gy = torch.empty_like(y)
            ga, gb = gy.chunk(2, 1)
            torch.mul(grad, b, out=ga)
            torch.mul(grad, a, out=gb)
        del y, a, b
        gz, gw, gb_ = bn_backward(gy, z, weight, mean, invstd, ctx.eps,
                                  tuple(ctx.needs_input_grad[:3]))
        return gz, gw, gb_, None, None, None, None


def bn_product(z: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
               eps: float) -> Tensor:
    """y[:, :w] ⊙ y[:, w:] with y = training-mode BN(z) (running statistics updated)."""
    return _BNProduct.apply(z, weight, bias, running_mean, running_var, momentum, eps)


class _BNConv1x1(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, d: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float, weight: Tensor) -> Tensor:
        y, mean, invstd = bn_forward(d, bn_weight, bn_bias, running_mean, running_var,
                                     momentum, eps)
        out = F.conv2d(y.to(weight.dtype), weight)
        ctx.save_for_backward(d, bn_weight, bn_bias, mean, invstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        y = bn_normalize(d, bn_weight, bn_bias, mean, invstd, ctx.eps).to(weight.dtype)
        need_y = any(need[:3])
        gy, gw, _ = torch.ops.aten.convolution_backward(
            grad.to(weight.dtype), y, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_y, need[7], False])
        del y
        gd = gbw = gbb = None
        if need_y:
            gd, gbw, gbb = bn_backward(gy.to(d.dtype), d, bn_weight, mean, invstd, ctx.eps,
                                       tuple(need[:3]))
        return gd, gbw, gbb, None, None, None, None, gw if need[7] else None


def bn_conv1x1(d: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
               eps: float, weight: Tensor) -> Tensor:
    """conv2d(BN(d), weight) for a 1x1, stride-1, bias-free conv, BN in training mode."""
    return _BNConv1x1.apply(d, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                            weight)


class _QLBranchSave(torch.autograd.Function):
    """conv1x1 -> BN1 -> product -> depthwise conv -> BN2 -> conv1x1, keeping only x, the
    weights and the batch statistics; backward recomputes the branch up to BN2's output."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                g1: Tensor | None, b1: Tensor | None, g2: Tensor | None, b2: Tensor | None,
                stats: tuple[Tensor | None, ...], conf: tuple[float, float, float, float, int]
                ) -> Tensor:
        rm1, rv1, rm2, rv2 = stats
        mom1, eps1, mom2, eps2, stride = conf
        y1, m1, s1 = bn_forward(F.conv2d(x, w1), g1, b1, rm1, rv1, mom1, eps1)
        a, b = y1.chunk(2, 1)
        d = F.conv2d(a * b, w2, None, stride, 1, 1, w2.shape[0])
        del y1, a, b
        y2, m2, s2 = bn_forward(d, g2, b2, rm2, rv2, mom2, eps2)
        del d
        out = F.conv2d(y2.to(w3.dtype), w3)
        ctx.save_for_backward(x, w1, w2, w3, g1, b1, g2, b2, m1, s1, m2, s2)
        ctx.conf = conf
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, w2, w3, g1, b1, g2, b2, m1, s1, m2, s2 = ctx.saved_tensors
        _, eps1, _, eps2, stride = ctx.conf
        need = ctx.needs_input_grad
        conv = torch.ops.aten.convolution_backward
        z = F.conv2d(x, w1)
        y1 = bn_normalize(z, g1, b1, m1, s1, eps1)
        a, b = y1.chunk(2, 1)
        p = a * b
        width = w2.shape[0]
        d = F.conv2d(p, w2, None, stride, 1, 1, width)
        y2 = bn_normalize(d, g2, b2, m2, s2, eps2).to(w3.dtype)
        gy2, gw3, _ = conv(grad.to(w3.dtype), y2, w3, None, [1, 1], [0, 0], [1, 1], False,
                           [0, 0], 1, [True, need[3], False])
        del y2
        gd, gg2, gb2 = bn_backward(gy2.to(d.dtype), d, g2, m2, s2, eps2, (True, need[6], need[7]))
        del d, gy2
        gp, gw2, _ = conv(gd, p, w2, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], width,
                          [True, need[2], False])
        del p, gd
        gy1 = torch.cat([gp * b, gp * a], 1)
        del y1, a, b, gp
        gz, gg1, gb1 = bn_backward(gy1, z, g1, m1, s1, eps1, (True, need[4], need[5]))
        del gy1
        gx, gw1, _ = conv(gz, x, w1, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                          [need[0], need[1], False])
        return (gx if need[0] else None, gw1 if need[1] else None, gw2 if need[2] else None,
                gw3 if need[3] else None, gg1, gb1, gg2, gb2, None, None)


def ql_branch_save(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, g1: Tensor | None,
                   b1: Tensor | None, g2: Tensor | None, b2: Tensor | None,
                   stats: tuple[Tensor | None, ...], conf: tuple[float, float, float, float, int]
                   ) -> Tensor:
    """The QL block's branch up to conv3 (BN3 and the skip stay outside), keeping only x,
    the weights and the batch statistics. ``stats``: (running mean/var of BN1, of BN2);
    ``conf``: (momentum1, eps1, momentum2, eps2, stride)."""
    return _QLBranchSave.apply(x, w1, w2, w3, g1, b1, g2, b2, stats, conf)


def ql_branch_train(block: nn.Module, x: Tensor) -> Tensor:
    """A QL block's branch up to conv3's output (BN3 and the skip stay with the block), in
    training: ``block.memory`` "default" (BN1 + product and BN2 + conv3 as Functions) or
    "save" (:func:`ql_branch_save`)."""
    dev = x.device.type
    dtype = autocast_dtype(dev)
    bn1, bn2 = block.bn1, block.bn2
    if block.memory == "save":
        n, _, h, w = x.shape
        s = block.stride
        rm1, rv1, mom1 = bn_train_args(bn1, (n, 1, h, w))
        rm2, rv2, mom2 = bn_train_args(bn2, (n, 1, (h - 1) // s + 1, (w - 1) // s + 1))
        xc, w1, w2, w3 = autocast_cast(dtype, x, block.conv1.weight, block.conv2.weight,
                                       block.conv3.weight)
        with NoAutocast(dev, dtype is not None):
            return ql_branch_save(xc, w1, w2, w3, bn1.weight, bn1.bias, bn2.weight, bn2.bias,
                                  (rm1, rv1, rm2, rv2), (mom1, bn1.eps, mom2, bn2.eps, s))
    z = block.conv1(x)
    rm, rv, momentum = bn_train_args(bn1, z.shape)
    with NoAutocast(dev, dtype is not None):
        y = bn_product(z, bn1.weight, bn1.bias, rm, rv, momentum, bn1.eps)
    d = block.conv2(y)
    rm, rv, momentum = bn_train_args(bn2, d.shape)
    (weight,) = autocast_cast(dtype, block.conv3.weight)
    with NoAutocast(dev, dtype is not None):
        return bn_conv1x1(d, bn2.weight, bn2.bias, rm, rv, momentum, bn2.eps, weight)
