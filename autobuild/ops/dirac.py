"""The Dirac conv, conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖), as one autograd Function.

Plain autograd builds the combined weight from W, α, β with four weight-sized ops and keeps
their intermediates and the combined weight itself for backward: on a network whose weights
are large next to its activations (resnet18 at 64x64) that is most of what a training step
keeps. This Function keeps only x, W and the per-channel vectors (α, β, ‖W_o‖). Where the layer's
output is larger than its weight the combined weight is a temporary in forward and is
rebuilt in backward (one weight-sized pass each); where it is smaller (the late, wide
layers) s and α are applied to the activations instead — s ⊙ conv(x, W) + α ⊙ x forward,
conv_transpose(s ⊙ g, W) + α ⊙ g backward — and no weight-sized temporary is built at all.
The gradients of W, α, β come from the combined weight's gradient (the conv's weight
gradient, which does not depend on the weight) in closed form:

    s_o = β_o / ‖W_o‖,            W_eff = s·W + α·δ
    dα_o = dW_eff[o, o mod (C_in/groups), centre]      (where δ has its 1)
    t_o  = <dW_eff_o, W_o>,       dβ_o = t_o / ‖W_o‖
    dW_o = s_o · (dW_eff_o - (t_o / ‖W_o‖²) · W_o)

‖W_o‖ is clamped at 1e-12 as ``F.normalize`` does (below it the W/‖W‖ term is W/1e-12 and
its gradient s·dW_eff).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from autobuild.ops.common import single_backward

__all__ = ["dirac_conv2d", "dirac_weight"]

EPS = 1e-12


def _identity_view(w: Tensor, groups: int) -> Tensor:
    """The entries of a (C_out, C_in/groups, kh, kw) weight where δ has its ones, as a
    (groups, min(C_out/groups, C_in/groups)) view (``torch.nn.init.dirac_``'s layout)."""
    out_c, in_g, kh, kw = w.shape
    m = min(out_c // groups, in_g)
    centre = w.view(groups, out_c // groups, in_g, kh, kw)[:, :m, :m, kh // 2, kw // 2]
    return centre.diagonal(0, 1, 2)


def dirac_weight(weight: Tensor, alpha: Tensor, beta: Tensor, groups: int,
                 norm: Tensor | None = None) -> Tensor:
    """diag(α)·δ + diag(β)·W/‖W_o‖ without building δ: one pass over W, then α is added on
    δ's diagonal in place."""
    if norm is None:
        norm = weight.flatten(1).norm(dim=1).clamp_min(EPS)
    w = weight * (beta / norm).to(weight.dtype).view(-1, 1, 1, 1)
    ident = _identity_view(w, groups)
    m = ident.shape[1]
    ident.add_(alpha.to(w.dtype).view(groups, -1)[:, :m])
    return w


def _activation_form(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Apply s and α to the activations (conv with W itself) rather than build s·W + α·δ,
    where the layer's output is smaller than its weight (late, wide layers): a pass over
    the output costs less than a weight-sized temporary in forward and again in backward."""
    out = x.numel() // max(x.shape[1], 1) * weight.shape[0]
    return groups == 1 and out < weight.numel()


def _identity_add(y: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """y[:, :m] += coef[:m]·x[:, :m] (the α·δ term on activations, groups = 1)."""
    m = min(y.shape[1], x.shape[1])
    shape = (1, m) + (1,) * (y.dim() - 2)
    y[:, :m].addcmul_(x[:, :m], coef[:m].to(y.dtype).view(shape))
    return y


class _DiracConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, alpha: Tensor, beta: Tensor,
                bias: Tensor | None, padding: Sequence[int], dilation: Sequence[int],
                groups: int) -> Tensor:
        norm = weight.detach().flatten(1).norm(dim=1).clamp_min(EPS)
        b = bias if bias is None else bias.to(x.dtype)
        act = _activation_form(x, weight, groups)
        if act:  # s ⊙ conv(x, W) + α ⊙ x
            scale = (beta.detach() / norm).to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
            out = torch.conv2d(x, weight.detach().to(x.dtype), None, 1, padding, dilation, 1)
            _identity_add(out.mul_(scale), x, alpha.detach())
            if b is not None:
                out.add_(b.view_as(scale))
        else:
            w = dirac_weight(weight.detach(), alpha.detach(), beta.detach(), groups, norm)
            # autocast: the conv runs in x's (lower) dtype
            out = torch.conv2d(x, w.to(x.dtype), b, 1, padding, dilation, groups)
        ctx.save_for_backward(x, weight, alpha, beta, norm)
        ctx.conf = (list(padding), list(dilation), groups, bias is not None, act)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, alpha, beta, norm = ctx.saved_tensors
        padding, dilation, groups, has_bias, act = ctx.conf
        need = ctx.needs_input_grad
        grad = grad.to(x.dtype)
        need_w = need[1] or need[2] or need[3]
        conv_backward = torch.ops.aten.convolution_backward
        geometry = ([1, 1], padding, dilation, False, [0, 0], groups)
        bias_sizes = [weight.shape[0]] if has_bias else None
        wx = weight.to(x.dtype)
        if act:
            gx = None
            if need[0]:  # input gradient of s ⊙ conv(x, W) + α ⊙ x
                scale = (beta / norm).to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
                gx = conv_backward(grad * scale, x, wx, None, *geometry,
                                   [True, False, False])[0]
                _identity_add(gx, grad, alpha)
            _, gw, gb = conv_backward(grad, x, wx, bias_sizes, *geometry,
                                      [False, need_w, need[4] and has_bias])
        else:
            w = dirac_weight(weight, alpha, beta, groups, norm).to(x.dtype)
            gx, gw, gb = conv_backward(grad, x, w, bias_sizes, *geometry,
                                       [need[0], need_w, need[4] and has_bias])
            del w
        g_weight = g_alpha = g_beta = None
        if need_w:  # gw: the gradient of the combined weight s·W + α·δ
            gw = gw.to(weight.dtype)
            if need[2]:
                ident = _identity_view(gw, groups)
                g_alpha = torch.zeros_like(alpha)
                g_alpha.view(groups, -1)[:, :ident.shape[1]] = ident.to(alpha.dtype)
            # t_o = <dW_eff_o, W_o> (vecdot: no weight-sized temporary kept; bmm is 2x slower)
            t = torch.linalg.vecdot(gw.flatten(1), weight.flatten(1))
            if need[3]:
                g_beta = (t / norm).to(beta.dtype)
            if need[1]:
                s = beta / norm
                # Below the clamp (‖W_o‖ < EPS) the norm is a constant: no projection term.
                coef = torch.where(norm > EPS, s * t / norm.square(), torch.zeros_like(t))
                shape = (-1,) + (1,) * (gw.dim() - 1)
                g_weight = gw.mul_(s.view(shape)).addcmul_(weight, coef.view(shape), value=-1)
        g_bias = gb.to(ctx.bias_dtype) if need[4] and has_bias else None
        return gx if need[0] else None, g_weight, g_alpha, g_beta, g_bias, None, None, None


def dirac_conv2d(x: Tensor, weight: Tensor, alpha: Tensor, beta: Tensor, bias: Tensor | None,
                 padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖, bias), stride 1, keeping x, W, α, β, ‖W‖."""
    return _DiracConv.apply(x, weight, alpha, beta, bias, padding, dilation, groups)
