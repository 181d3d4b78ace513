"""The quadratic family's layers (see ``autobuild.variants.quadratic`` for the types and
their formulas): one module for Conv2d sites, one for Linear sites, sharing the branch
layout, the second-order combination and ``init=preserve``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.common import fused_ok
from autobuild.ops.quadratic import ours_conv_train, ours_linear_train

__all__ = ["MEMORY_MODES", "PRESERVING_TYPES", "QUADRATIC_TYPES", "VOLTERRA_MAX_PARAMS",
           "QuadraticConv2d", "QuadraticLinear"]

#: type -> number of weight sets that read x (fan adds one more that reads x ⊙ x).
QUADRATIC_TYPES = {"ours": 3, "t2": 1, "t3": 1, "t4": 2, "fan": 2, "volterra": 1}
PRESERVING_TYPES = ("ours", "fan", "volterra")
#: Volterra layers above this many parameters are refused (A_o alone is (C·k²)² per output).
VOLTERRA_MAX_PARAMS = 8_000_000
#: ``ours``' training backward: "default" keeps the conv output (BN and product fused),
#: "save" keeps only the input, weights and batch statistics and recomputes the conv.
MEMORY_MODES = ("default", "save")


class _Quadratic(nn.Module):
    """Shared machinery of the conv and linear versions; subclasses define ``_linear``
    (the layer's first-order op) and ``_batch_norm``."""

    in_channels: int
    out_channels: int
    groups: int = 1
    #: autobuild.masked(): the second-order part is switched off (see QuadraticVariant).
    masked: bool = False

    def __init__(self, qtype: str, in_channels: int, out_channels: int, fan_in_shape: Sequence[int],
                 bias: bool) -> None:
        super().__init__()
        if qtype not in QUADRATIC_TYPES:
            raise AutobuildError(f"unknown quadratic type {qtype!r}; valid: "
                                 f"{', '.join(QUADRATIC_TYPES)}")
        self.qtype = qtype
        #: ``ours`` only: "default" or "save" (MEMORY_MODES); not part of the state_dict.
        self.memory = "default"
        self.in_channels, self.out_channels = in_channels, out_channels
        n = QUADRATIC_TYPES[qtype]
        if qtype == "volterra":
            d = math.prod(fan_in_shape)
            self.quad = nn.Parameter(torch.empty(out_channels, d, d))
        self.weight = nn.Parameter(torch.empty(n * out_channels, *fan_in_shape))
        has_bias = bias or qtype == "fan"  # fan's b_a, b_b are part of its formula
        self.bias = nn.Parameter(torch.zeros(n * out_channels)) if has_bias else None
        self.weight_sq = (nn.Parameter(torch.empty(out_channels, *fan_in_shape))
                          if qtype == "fan" else None)
        # Fan et al.'s output bias c (the neuron is (w_r x + b_r)(w_g x + b_g) + w_b x² + c).
        self.bias_sq = nn.Parameter(torch.zeros(out_channels)) if qtype == "fan" else None
        self.bn = self._batch_norm(3 * out_channels) if qtype == "ours" else None
        self.reset_parameters()

    def _batch_norm(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def _branches(self, t: Tensor, dim: int) -> tuple[Tensor, ...]:
        """Split the n-branch output along channel ``dim``. Each conv group holds its
        branches side by side ([a|b|c] per group), so grouped convs stay correct."""
        n = QUADRATIC_TYPES[self.qtype]
        if n == 1:
            return (t,)
        g = self.groups
        shape = t.shape[:dim] + (g, n, self.out_channels // g) + t.shape[dim + 1:]
        parts = t.reshape(shape).unbind(dim + 1)
        return tuple(p.flatten(dim, dim + 1) for p in parts)

    def branch_weight(self, i: int, tensor: Tensor | None = None) -> Tensor:
        """A view of branch ``i``'s rows of ``tensor`` (default the weight), in the layer's
        (out_channels, ...) layout."""
        t = self.weight if tensor is None else tensor
        n, g = QUADRATIC_TYPES[self.qtype], self.groups
        return t.view(g, n, self.out_channels // g, *t.shape[1:])[:, i].reshape(
            self.out_channels, *t.shape[1:])

    @torch.no_grad()
    def _set_branch(self, i: int, value: Tensor | float, tensor: Tensor | None = None) -> None:
        t = self.weight if tensor is None else tensor
        n, g = QUADRATIC_TYPES[self.qtype], self.groups
        view = t.view(g, n, self.out_channels // g, *t.shape[1:])
        if isinstance(value, Tensor):
            value = value.reshape(g, self.out_channels // g, *t.shape[1:])
        view[:, i] = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh initialisation (``init=scratch``): each weight set like a new conv of the
        baseline's shape; fan starts linear (W_b = 0, b_b = 1, W_c = 0) as Fan et al. do;
        volterra's quadratic kernel starts small."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = math.prod(self.weight.shape[1:])
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.qtype == "fan":
            self._set_branch(1, 0.0)
            self._set_branch(1, 1.0, self.bias)
            self.weight_sq.zero_()
            self.bias_sq.zero_()
        if self.qtype == "volterra":
            nn.init.uniform_(self.quad, -0.1 / fan_in, 0.1 / fan_in)
        if self.qtype == "ours":
            # The product term starts at zero (BN_a's gamma = 0, as residual nets zero their
            # last BN): a product of two unit-variance branches at full scale squares any
            # scale error layer after layer, which overflows a deep net in eval mode while
            # its BN running statistics are still catching up. gamma_a learns the scale.
            self._set_branch(0, 0.0, self.bn.weight)

    @torch.no_grad()
    def preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Compute exactly ``weight``·x + ``bias`` (the baseline layer) until trained."""
        if self.qtype not in PRESERVING_TYPES:
            raise AutobuildError(f"quadratic type {self.qtype} has no first-order term and "
                                 "cannot preserve the baseline; use --init scratch or type "
                                 f"{'/'.join(PRESERVING_TYPES)}")
        if self.qtype == "ours":
            # The product is BN_a(.) * BN_b(.): BN_a with gamma = beta = 0 makes it exactly 0
            # while gamma_a still receives gradient. BN_c starts as the identity.
            self._set_branch(2, weight.to(self.weight.dtype))
            if self.bias is not None:
                self.bias.zero_()
                self._set_branch(2, bias if bias is not None else 0.0, self.bias)
            bn = self.bn
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            self._set_branch(0, 0.0, bn.weight)
            c_gamma = math.sqrt(1.0 + bn.eps)
            self._set_branch(2, c_gamma, bn.weight)
        elif self.qtype == "fan":
            self._set_branch(0, weight)
            self._set_branch(1, 0.0)
            self._set_branch(0, bias if bias is not None else 0.0, self.bias)
            self._set_branch(1, 1.0, self.bias)
            self.weight_sq.zero_()
            self.bias_sq.zero_()
        else:  # volterra: quadratic kernel 0, linear part = the baseline
            self.quad.zero_()
            self.weight.copy_(weight.reshape(self.weight.shape))
            if self.bias is not None:
                self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def _combine(self, y: Tensor, x_sq_term: Tensor | None, dim: int) -> Tensor:
        q = self.qtype
        if q in ("t2", "t3"):
            # Masked: these types are all second-order, so the whole output is off.
            return torch.zeros_like(y) if self.masked else (y if q == "t2" else y.square())
        parts = self._branches(y, dim)
        if q == "t4":
            return torch.zeros_like(parts[0]) if self.masked else parts[0] * parts[1]
        if q == "ours":
            return parts[2] if self.masked else torch.addcmul(parts[2], parts[0], parts[1])
        if q == "fan":
            return x_sq_term if self.masked else torch.addcmul(x_sq_term, parts[0], parts[1])
        raise AssertionError(q)

    def extra_repr(self) -> str:
        memory = ", memory=save" if self.memory == "save" else ""
        return f"{self.in_channels}, {self.out_channels}, type={self.qtype}{memory}"


class QuadraticConv2d(_Quadratic):
    """A quadratic replacement of an ``nn.Conv2d`` (same stride, padding, dilation, groups)."""

    def __init__(self, qtype: str, in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] | str = 0, dilation: int | Sequence[int] = 1,
                 groups: int = 1, bias: bool = True) -> None:
        k = tuple(kernel_size) if isinstance(kernel_size, Sequence) else (kernel_size,) * 2
        self.kernel_size = k
        self.stride = tuple(stride) if isinstance(stride, Sequence) else (stride,) * 2
        self.padding = padding if isinstance(padding, str) else (
            tuple(padding) if isinstance(padding, Sequence) else (padding,) * 2)
        self.dilation = tuple(dilation) if isinstance(dilation, Sequence) else (dilation,) * 2
        self.groups = groups
        if qtype == "volterra" and (groups != 1 or isinstance(self.padding, str)):
            raise AutobuildError("volterra converts dense convs with numeric padding only")
        super().__init__(qtype, in_channels, out_channels, (in_channels // groups, *k), bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qtype: str) -> QuadraticConv2d:
        if conv.padding_mode != "zeros":
            raise AutobuildError(f"quadratic converts zero-padded convs only (this one uses "
                                 f"padding_mode={conv.padding_mode!r})")
        layer = cls(qtype, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None)
        return layer.to(conv.weight.device, conv.weight.dtype)

    def _batch_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _numeric_padding(self) -> tuple[int, int] | None:
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)

    def _ours_train(self, x: Tensor) -> Tensor:
        """Training forward of ``ours`` through the fused ops (autograd records)."""
        return ours_conv_train(self, x, self._numeric_padding())

    def forward(self, x: Tensor) -> Tensor:
        if self.qtype == "volterra":
            return self._volterra(x)
        if self.qtype == "ours" and not self.masked and fused_ok(self.bn, x, self.weight):
            return self._ours_train(x)
        inp = x.square() if self.qtype == "t2" else x
        y = self._conv(inp, self.weight, self.bias)
        if self.bn is not None:
            y = self.bn(y)
        sq = (self._conv(x.square(), self.weight_sq, self.bias_sq) if self.qtype == "fan"
              else None)
        return self._combine(y, sq, 1)

    def _volterra(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ph, pw = self.padding
        dh, dw = self.dilation
        sh, sw = self.stride
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        p = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # B, D, L
        d = p.shape[1]
        # (reshape: a channels_last model stores its 4-d weights permuted)
        lin = torch.matmul(self.weight.reshape(self.out_channels, d), p)  # B, O, L
        if self.bias is not None:
            lin = lin + self.bias.view(1, -1, 1)
        if self.masked:
            return lin.view(b, self.out_channels, ho, wo)
        ap = torch.matmul(self.quad.reshape(self.out_channels * d, d), p)  # B, O*D, L
        quad = (ap.view(b, self.out_channels, d, -1) * p.unsqueeze(1)).sum(2)
        return (lin + quad).view(b, self.out_channels, ho, wo)


class QuadraticLinear(_Quadratic):
    """A quadratic replacement of an ``nn.Linear`` (any number of leading dimensions)."""

    def __init__(self, qtype: str, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(qtype, in_features, out_features, (in_features,), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str) -> QuadraticLinear:
        layer = cls(qtype, linear.in_features, linear.out_features, linear.bias is not None)
        return layer.to(linear.weight.device, linear.weight.dtype)

    def _batch_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm1d(channels)

    def _ours_train(self, x: Tensor) -> Tensor:
        """Training forward of ``ours`` through the fused ops (autograd records)."""
        return ours_linear_train(self, x)

    def forward(self, x: Tensor) -> Tensor:
        if self.qtype == "volterra":
            lin = F.linear(x, self.weight, self.bias)
            if self.masked:
                return lin
            ap = F.linear(x, self.quad.view(-1, self.in_channels))
            return lin + (ap.unflatten(-1, (self.out_channels, self.in_channels))
                          * x.unsqueeze(-2)).sum(-1)
        if self.qtype == "ours" and not self.masked and fused_ok(self.bn, x, self.weight):
            return self._ours_train(x)
        inp = x.square() if self.qtype == "t2" else x
        y = F.linear(inp, self.weight, self.bias)
        if self.bn is not None:
            y = self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        sq = F.linear(x.square(), self.weight_sq, self.bias_sq) if self.qtype == "fan" else None
        return self._combine(y, sq, y.dim() - 1)
