"""Max-pooling that keeps two bytes per output for backward (on planes under 32768
elements; four above).

``F.max_pool2d`` keeps its input and an int64 index per output for backward (on a ReLU'd
input that storage is shared, but the indices alone are two floats' worth per output).
:func:`max_pool2d` runs the same native kernel and keeps only its indices, narrowed to int16
(flat positions in the H x W plane; int32 for planes of 32768 elements or more): half a
float per output, nothing of the input. The backward widens them again and calls the
native ``max_pool2d_with_indices_backward``, so
outputs and gradients are exactly the plain op's (ties included, which are common after a
ReLU: both pick the first maximum in row-major order).

On CPU the kernel runs in channels_last (NCHW inputs are converted and the output converted
back): its NCHW loop is scalar, about 6x slower than the channels_last one, which is
vectorised over channels — that is most of what the parameter-free family pays for its
pools. Inference (no autograd) skips the indices: on CPU the maxima are taken with strided
elementwise maxima over the kh·kw taps (faster still).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from autobuild.ops.common import fused_enabled, single_backward

__all__ = ["max_pool2d"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _taps(t: Tensor, dim: int, k: int, s: int, d: int, n_out: int) -> list[Tensor]:
    """The k strided slices of ``t`` along ``dim`` that tap each window."""
    return [t.narrow(dim, j * d, s * (n_out - 1) + 1)[(slice(None),) * (dim % t.dim())
                                                      + (slice(None, None, s),)]
            for j in range(k)]


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:  # the last window must start inside input + left pad
        out -= 1
    return out


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, k: tuple[int, int], s: tuple[int, int],
                p: tuple[int, int], d: tuple[int, int], ceil: bool) -> Tensor:
        cl = _channels_last(x)
        inp = x
        if x.device.type == "cpu" and x.dim() == 4 and not cl:
            # The CPU kernel is vectorised over channels only in channels_last (about 6x
            # faster than its NCHW loop, conversions included).
            inp = x.contiguous(memory_format=torch.channels_last)
        out, index = torch.ops.aten.max_pool2d_with_indices(inp, k, s, p, d, ceil)
        del inp
        if x.dim() == 4 and not cl:
            out = out.contiguous()
        # The kernel's indices are flat positions in the (H, W) plane: int16 holds them for
        # planes under 32768 elements (int32 otherwise). One kernel converts and lays them
        # out contiguously.
        plane = x.shape[-2] * x.shape[-1]
        index = index.to(torch.int16 if plane < 2**15 else torch.int32,
                         memory_format=torch.contiguous_format)
        ctx.save_for_backward(index)
        ctx.conf = (x.shape, x.dtype, x.device, k, s, p, d, ceil, cl)
        return out

    @staticmethod
    @single_backward
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (arg,) = ctx.saved_tensors
        shape, dtype, device, k, s, p, d, ceil, cl = ctx.conf
        index = arg.long()
        fmt = torch.channels_last if cl else torch.contiguous_format
        like = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.to(dtype), like, list(k), list(s), list(p), list(d), ceil, index)
        return gx, None, None, None, None, None


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def _max_only(x: Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
              d: tuple[int, int], ceil: bool) -> Tensor:
    """The separable scan without offsets (inference)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = x.shape[-2:], k, s, p, d
    ho, wo = _out_size(h, kh, sh, ph, dh, ceil), _out_size(w, kw, sw, pw, dw, ceil)
    pad_b = max(0, (ho - 1) * sh + dh * (kh - 1) + 1 - h - ph)
    pad_r = max(0, (wo - 1) * sw + dw * (kw - 1) + 1 - w - pw)
    if ph or pw or pad_b or pad_r:
        x = F.pad(x, (pw, pad_r, ph, pad_b), value=float("-inf"))
    out = x
    for dim, kk, ss, dd, n in ((-1, kw, sw, dw, wo), (-2, kh, sh, dh, ho)):
        taps = _taps(out, dim, kk, ss, dd, n)
        out = taps[0].clone()
        for t in taps[1:]:
            torch.maximum(out, t, out=out)
    return out


def max_pool2d(x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None
               = None, padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
               ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d``: the same outputs and gradients, two bytes per output kept for
    backward (see the module docstring)."""
    k = _pair(kernel_size)
    s = _pair(stride if stride is not None and stride != [] else kernel_size)
    p, d = _pair(padding), _pair(dilation)
    if not fused_enabled():
        return F.max_pool2d(x, k, s, p, d, ceil_mode)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool.apply(x, k, s, p, d, ceil_mode)
    if x.device.type != "cpu" or x.dim() not in (3, 4) or _channels_last(x):
        return F.max_pool2d(x, k, s, p, d, ceil_mode)
    return _max_only(x, k, s, p, d, ceil_mode)
