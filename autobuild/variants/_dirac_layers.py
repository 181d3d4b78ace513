"""The dirac family's layers: DiracConv2d (v2, with its fused training op), convs of any
dimension (the released ``DiracConv1d``/``DiracConv3d``) and DiracNets v1's layer (NCReLU
input, scalar α and β); ``autobuild.variants.dirac`` has the formulas and the family.

v1 (arXiv 1706.00388v1, branch ``v1`` of szagoruyko/diracnets): a block is
``BN(conv(NCReLU(x), α·δ + β·W/‖W_o‖))`` with NCReLU(x) = [max(x, 0), min(x, 0)] (twice the
channels), α and β one learned scalar each (α = 5, β = 1e-3 at init; W ~ N(0, 0.1²)), and δ the
v1 ``dirac_delta``: the identity on min(C_out, 2·C_in) channels tiled to the weight's shape,
so ``conv(NCReLU(x), δ)`` = max(x,0) + min(x,0) = x where C_out = C_in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.common import NoAutocast, autocast_cast, autocast_dtype, fused_ok
from autobuild.ops.dirac import dirac_conv2d, dirac_weight

__all__ = ["ALPHA_INIT", "BETA_INIT", "DiracConv1d", "DiracConv2d", "DiracConv3d",
           "DiracConvNd", "DiracConvV1", "NCReLU", "dirac_delta", "dirac_problem", "fold_into",
           "ncrelu", "v1_dirac_delta"]

_CONV = {1: (F.conv1d, nn.Conv1d), 2: (F.conv2d, nn.Conv2d), 3: (F.conv3d, nn.Conv3d)}


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != n:
        raise AutobuildError(f"expected {n} values, got {t}")
    return t


def _set_geometry(conv: nn.Module, in_channels: int, out_channels: int,
                  kernel_size: int | Sequence[int], dilation: int | Sequence[int], groups: int,
                  dims: int) -> None:
    """A Dirac conv's shape attributes and its (uninitialised) filter W, with the "same"
    padding that makes δ an identity; refuses an even kernel (δ has no centre)."""
    k, d = _tuple(kernel_size, dims), _tuple(dilation, dims)
    if any(v % 2 == 0 for v in k):
        raise AutobuildError(f"a Dirac conv needs an odd kernel (a centre for δ), got {k}")
    if in_channels % groups or out_channels % groups:
        raise AutobuildError(f"channels {in_channels}->{out_channels} are not divisible by "
                             f"groups={groups}")
    conv.in_channels, conv.out_channels, conv.groups = in_channels, out_channels, groups
    conv.kernel_size, conv.dilation = k, d
    conv.padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
    conv.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))


@torch.no_grad()
def fold_into(conv: nn.Module, weight: Tensor, bias: Tensor | None,
              bn: nn.modules.batchnorm._BatchNorm | None) -> nn.Module:
    """``conv`` (a fresh plain conv of the right geometry, with a bias iff ``bias`` or ``bn``)
    set to compute ``conv(x, weight) + bias`` followed by ``bn`` in eval mode; the algebra in
    float64, so that the fold is exact to the layer's own precision."""
    w = weight.double()
    b = bias.double() if bias is not None else None
    if bn is not None:
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b if b is not None else torch.zeros_like(scale)) - bn.running_mean.double()
        b = b * scale + (bn.bias.double() if bn.bias is not None else 0.0)
    conv = conv.to(weight.device, weight.dtype)
    conv.weight.copy_(w)
    if b is not None:
        conv.bias.copy_(b)
    return conv


class DiracConvNd(nn.Module):
    """``conv(x, diag(α)·δ + diag(β)·W/‖W_o‖) + b`` in ``dims`` (1-3) spatial dimensions,
    stride 1, "same" padding (DiracNets v2; per-output-channel α = 1, β = 0.1 at init)."""

    no_weight_decay_params: tuple[str, ...] = ("alpha", "beta")
    masked: bool = False
    dims: int = 2

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int] = 3, dilation: int | Sequence[int] = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        _set_geometry(self, in_channels, out_channels, kernel_size, dilation, groups, self.dims)
        self.alpha = nn.Parameter(torch.ones(out_channels))
        self.beta = nn.Parameter(torch.full((out_channels,), 0.1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        delta = nn.init.dirac_(torch.empty(out_channels, in_channels // groups,
                                           *self.kernel_size), groups)
        self.register_buffer("delta", delta, persistent=False)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_conv(cls, conv: nn.Module) -> DiracConvNd:
        """The Dirac conv with ``conv``'s geometry (stride 1, same padding, odd kernel)."""
        plain = _CONV[cls.dims][1]
        if type(conv) is not plain:
            raise AutobuildError(f"{cls.__name__} replaces an {plain.__name__}, not a "
                                 f"{type(conv).__name__}")
        same = tuple(di * (ki - 1) // 2 for ki, di in zip(conv.kernel_size, conv.dilation,
                                                          strict=True))
        if max(conv.stride) > 1 or tuple(conv.padding) != same or conv.padding_mode != "zeros":
            raise AutobuildError(f"cannot Dirac-parametrise {conv}: it needs stride 1 and zero "
                                 f"'same' padding {same}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation,
                    conv.groups, conv.bias is not None)
        return layer.to(conv.weight.device, conv.weight.dtype)

    @torch.no_grad()
    def preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """Compute exactly ``conv(x, weight) + bias``: W = weight, α = 0, β_o = ‖weight_o‖."""
        self.weight.copy_(weight)
        self.alpha.zero_()
        self.beta.copy_(weight.flatten(1).norm(dim=1))
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def _scale_shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.weight.dim() - 1)

    def effective_weight(self) -> Tensor:
        w = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight)
        shape = self._scale_shape()
        return torch.addcmul(self.beta.view(shape) * w, self.alpha.view(shape), self.delta)

    def forward(self, x: Tensor) -> Tensor:
        if self.masked:
            w = self.alpha.view(self._scale_shape()) * self.delta
        else:
            w = self.effective_weight()
        return _CONV[self.dims][0](x, w, self.bias, 1, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def folded(self, bn: nn.modules.batchnorm._BatchNorm | None = None) -> nn.Module:
        """The plain conv this layer (and ``bn``, in eval mode, when given) computes."""
        w = self.effective_weight()  # v1: its inputs are NCReLU's, twice the channels
        conv = _CONV[self.dims][1](w.shape[1] * self.groups, self.out_channels,
                                   self.kernel_size, 1, self.padding, self.dilation,
                                   self.groups, bias=self.bias is not None or bn is not None)
        return fold_into(conv, w, self.bias, bn)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class DiracConv1d(DiracConvNd):
    """The Dirac conv on (N, C, L) inputs (the released ``DiracConv1d``, v2 scales)."""

    dims = 1


class DiracConv3d(DiracConvNd):
    """The Dirac conv on (N, C, D, H, W) inputs (the released ``DiracConv3d``, v2 scales)."""

    dims = 3


def ncrelu(x: Tensor) -> Tensor:
    """Negative CReLU: [max(x, 0), min(x, 0)] along channels."""
    return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)


class NCReLU(nn.Module):
    """DiracNets v1's nonlinearity (doubles the channels)."""

    def forward(self, x: Tensor) -> Tensor:
        return ncrelu(x)


def v1_dirac_delta(out_channels: int, in_channels: int, k: int) -> Tensor:
    """v1's δ for a weight (out, in, k, k): the identity on min(out, in) channels, tiled
    (``dirac_delta`` of the v1 code)."""
    n = min(out_channels, in_channels)
    eye = nn.init.dirac_(torch.empty(n, n, k, k))
    return eye.repeat(max(out_channels // in_channels, 1), max(in_channels // out_channels, 1),
                      1, 1)


class DiracConvV1(DiracConvNd):
    """DiracNets v1's conv: ``conv2d(NCReLU(x), α·δ + β·W/‖W_o‖)`` with scalar α, β (5 and
    1e-3 at init), W ~ N(0, 0.1²); ``in_channels`` is the channel count before NCReLU."""

    dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(2 * in_channels, out_channels, kernel_size)
        self.alpha = nn.Parameter(torch.full((1,), 5.0))
        self.beta = nn.Parameter(torch.full((1,), 1e-3))
        self.delta = v1_dirac_delta(out_channels, 2 * in_channels, kernel_size)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(ncrelu(x))

    @torch.no_grad()
    def folded(self, bn: nn.modules.batchnorm._BatchNorm | None = None) -> nn.Module:
        """NCReLU followed by the plain conv (the released v1 models are folded this way)."""
        return nn.Sequential(NCReLU(), super().folded(bn))


#: Paper v2's initial identity and filter scales.
ALPHA_INIT, BETA_INIT = 1.0, 0.1


def dirac_delta(out_channels: int, in_channels: int, kernel_size: tuple[int, int],
                groups: int = 1) -> Tensor:
    """The kernel δ with ``conv2d(x, δ, groups=groups)`` = x on the first min(C_out, C_in)
    channels of each group (``torch.nn.init.dirac_``)."""
    return nn.init.dirac_(torch.empty(out_channels, in_channels // groups, *kernel_size), groups)


class DiracConv2d(nn.Module):
    """``conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖) + b``, stride 1, "same" padding (DiracNets v2).

    ``padding`` is derived from kernel and dilation, so that δ is an identity.
    """

    #: α and β are scales, not filters: the paper trains them without weight decay.
    no_weight_decay_params: tuple[str, ...] = ("alpha", "beta")
    #: autobuild.masked(): only the identity term diag(α)·δ is applied (the filter is off).
    masked: bool = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        _set_geometry(self, in_channels, out_channels, kernel_size, dilation, groups, 2)
        self.alpha = nn.Parameter(torch.full((out_channels,), ALPHA_INIT))
        self.beta = nn.Parameter(torch.full((out_channels,), BETA_INIT))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # δ is a function of the shape: rebuilt, never saved (the state_dict holds only
        # what training changes).
        self.register_buffer("delta", dirac_delta(out_channels, in_channels, self.kernel_size,
                                                  groups),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fill δ (``autobuild.load`` builds on the meta device and assigns the saved state,
        which does not hold δ)."""
        self.delta.copy_(dirac_delta(self.out_channels, self.in_channels, self.kernel_size,
                                     self.groups))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, strided_ok: bool = False) -> DiracConv2d:
        """A (stride-1) Dirac conv with ``conv``'s geometry, or an error saying why δ is not
        an identity. ``strided_ok``: the caller replaces the stride by a pooling."""
        problem = dirac_problem(conv, strided_ok=strided_ok)
        if problem:
            raise AutobuildError(f"cannot Dirac-parametrise this conv: {problem}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation,
                    conv.groups, conv.bias is not None)
        return layer.to(conv.weight.device, conv.weight.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``init=scratch``: a Gaussian W (only its direction matters), α = 1, β = 0.1."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.alpha.fill_(ALPHA_INIT)
        self.beta.fill_(BETA_INIT)
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """``init=preserve``: compute exactly ``conv2d(x, weight) + bias``: W = weight,
        α = 0, β_o = ‖weight_o‖ (a zero filter stays zero: F.normalize maps it to 0)."""
        self.weight.copy_(weight)
        self.alpha.zero_()
        self.beta.copy_(weight.flatten(1).norm(dim=1))
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def effective_weight(self) -> Tensor:
        """diag(α)·δ + diag(β)·W/‖W_o‖, the kernel the layer convolves with."""
        w = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight)
        shape = (-1, 1, 1, 1)
        return torch.addcmul(self.beta.view(shape) * w, self.alpha.view(shape), self.delta)

    def forward(self, x: Tensor) -> Tensor:
        if self.masked:  # autobuild.masked(): the identity term only
            weight = self.alpha.view(-1, 1, 1, 1) * self.delta
            return F.conv2d(x, weight, self.bias, 1, self.padding, self.dilation, self.groups)
        if fused_ok(None, x, self.weight, self.alpha, self.beta):
            # Training: one Function that keeps x and W, not the rebuilt weight
            # (autobuild.ops.dirac); same convolution, gradients in closed form.
            dev = x.device.type
            dtype = autocast_dtype(dev)
            (x,) = autocast_cast(dtype, x)
            with NoAutocast(dev, dtype is not None):
                return dirac_conv2d(x, self.weight, self.alpha, self.beta, self.bias,
                                    self.padding, self.dilation, self.groups)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            w = self.effective_weight()  # plain autograd (autobuild.ops.plain_ops)
        else:  # inference: build the weight without δ's full pass
            w = dirac_weight(self.weight, self.alpha, self.beta, self.groups)
        return F.conv2d(x, w, self.bias, 1, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def folded(self, bn: nn.modules.batchnorm._BatchNorm | None = None) -> nn.Conv2d:
        """The plain conv this layer (and ``bn``, in eval mode, when given) computes."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, 1, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None or bn is not None)
        return fold_into(conv, self.effective_weight(), self.bias, bn)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


def dirac_problem(conv: nn.Module, *, strided_ok: bool = False) -> str:
    """Why ``conv`` cannot become a Dirac conv ("" when it can)."""
    if type(conv) is not nn.Conv2d:
        return f"it is a {type(conv).__name__}, not an nn.Conv2d"
    k, d, p = conv.kernel_size, conv.dilation, conv.padding
    if any(v % 2 == 0 for v in k):
        return f"its kernel {tuple(k)} is even, so δ has no centre"
    if isinstance(p, str) and p != "same":
        return f"padding={p!r} shrinks the output, so δ is not an identity"
    same = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
    if not isinstance(p, str) and tuple(p) != same:
        return f"padding {tuple(p)} is not 'same' for kernel {tuple(k)}, so δ is not an identity"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is supported)"
    if not strided_ok and max(conv.stride) > 1:
        return f"stride {tuple(conv.stride)} > 1 (a Dirac conv has stride 1)"
    return ""


# ---- network scope: ResNet -> DiracNet ------------------------------------------------------
