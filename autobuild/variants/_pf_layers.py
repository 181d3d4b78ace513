"""The parameter-free family's layers: the pool (or Wu et al.'s shift) that replaces a spatial
conv, and PfLayer's efficient transformer layer that replaces a self-attention
(naver-ai/PfLayer ``vit_pf.py``, ``EffLayer``): Linear -> GELU -> pool on the token grid ->
GELU -> Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.pool import max_pool2d

__all__ = ["POOLS", "ParameterFreeLayer", "Shift2d", "TokenPoolLayer", "auto_prefix",
           "grid_side", "make_pool", "run_pool"]

#: The parameter-free operations of PfLayer's layer study that autobuild builds, and Wu et
#: al.'s shift (CVPR 2018), the parameter-free spatial operation PfLayer's paper cites.
POOLS = ("max", "avg", "identity", "shift")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Shift2d(nn.Module):
    """Wu et al., "Shift: A Zero FLOP, Zero Parameter Alternative to Spatial Convolutions"
    (CVPR 2018): the ``channels`` are split into one contiguous group per kernel tap, and each
    group is read at its tap's offset, with zeros where that falls outside the input.

    A k×k shift thus has the receptive field of the k×k conv it replaces, no parameters and
    no MACs. Groups, in channel order: the taps row by row without the centre, then the
    centre (zero-shift) tap last; each of the first ``kh·kw - 1`` gets ``channels //
    (kh·kw)`` channels and the centre group gets the rest (so with fewer channels than taps
    every channel stays in place; chainer's ``shift`` also gives the centre the rest, with
    another tap order and sign). In the same-size case (padding ``d·(k//2)``) a tap
    (dy, dx) in {-(k//2)..k//2}² reads ``x[i + d·dy, j + d·dx]``, i.e. that group's map is
    translated by (-d·dy, -d·dx).

    ``stride``, ``padding`` and ``dilation`` mean what they mean for the conv: output
    ``(i, j)`` of a tap (ty, tx) in [0, k) reads the zero-padded input at
    ``(i·s + ty·d, j·s + tx·d)``. The output therefore has the conv's size, and a strided
    shift is the stride-1 shift with every s-th pixel kept (``out[..., ::s, ::s]``). It equals
    a depthwise conv with one-hot kernels, but only slices and copies: nothing is multiplied
    (``autobuild.count`` sees a pad, slices and a concatenation: 0 MACs, 0 FLOPs).
    """

    def __init__(self, channels: int, kernel: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, *,
                 padding: int | tuple[int, int] | None = None,
                 dilation: int | tuple[int, int] = 1) -> None:
        super().__init__()
        k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
        # None: "same" padding, the size a stride-1 shift keeps.
        p = tuple(di * (ki // 2) for ki, di in zip(k, d, strict=True)) if padding is None \
            else _pair(padding)
        if channels < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
            raise AutobuildError(f"Shift2d: channels {channels}, stride {s}, dilation {d} "
                                 f"must be >= 1 and padding {p} >= 0")
        if any(ki < 1 or ki % 2 == 0 for ki in k):
            raise AutobuildError(f"Shift2d: kernel {k} must have odd sides (the centre "
                                 "group is the one that does not move)")
        self.channels, self.kernel_size, self.stride = channels, k, s
        self.padding: tuple[int, int] = (p[0], p[1])
        self.dilation = d
        taps = [(ty, tx) for ty in range(k[0]) for tx in range(k[1])]
        centre = (k[0] // 2, k[1] // 2)
        taps.remove(centre)
        taps.append(centre)
        size = channels // len(taps)
        starts = [g * size for g in range(len(taps))] + [channels]
        #: (first channel, end channel, tap row, tap column) of each non-empty group.
        self.groups: tuple[tuple[int, int, int, int], ...] = tuple(
            (starts[g], starts[g + 1], ty, tx) for g, (ty, tx) in enumerate(taps)
            if starts[g + 1] > starts[g])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise AutobuildError(f"Shift2d({self.channels}) got an input of shape "
                                 f"{tuple(x.shape)}; expected (N, {self.channels}, H, W)")
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        # One zero pad for all groups; each group is then a strided view of it.
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        kh, kw = self.kernel_size
        # The conv's output size: floor((n + 2p - d(k-1) - 1) / s) + 1.
        ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise AutobuildError(f"Shift2d: input {tuple(x.shape[2:])} is smaller than the "
                                 f"kernel {self.kernel_size} at dilation {self.dilation}")
        pieces = [xp[:, c0:c1, ty * dh:ty * dh + (ho - 1) * sh + 1:sh,
                     tx * dw:tx * dw + (wo - 1) * sw + 1:sw]
                  for c0, c1, ty, tx in self.groups]
        # cat copies even a single group: the output never aliases the input, which an
        # in-place activation after the layer would otherwise overwrite.
        return torch.cat(pieces, dim=1)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


def make_pool(op: str, kernel: int | tuple[int, int], stride: int | tuple[int, int],
              padding: int | tuple[int, int], dilation: int | tuple[int, int] = 1, *,
              channels: int | None = None) -> nn.Module:
    """``op`` as a module. The average excludes the zero padding (a border output is the mean
    of the pixels it sees), so a constant map stays constant as it does under a max-pool.
    The shift needs ``channels`` (it assigns them to the kernel taps) and pads with zeros."""
    if op == "shift":
        if channels is None:
            raise AutobuildError("make_pool('shift', ...) needs channels=")
        return Shift2d(channels, kernel, stride, padding=padding, dilation=dilation)
    if op == "max":
        return nn.MaxPool2d(kernel, stride, padding, dilation)
    if op == "avg":
        return nn.AvgPool2d(kernel, stride, padding, count_include_pad=False)
    if op == "identity":
        return nn.Identity()
    raise AutobuildError(f"unknown parameter-free operation {op!r}; valid: {', '.join(POOLS)}")


def run_pool(pool: nn.Module, x: Tensor) -> Tensor:
    if type(pool) is nn.MaxPool2d and not pool.return_indices:
        # Same outputs and gradients as the module; keeps 2 bytes per output for
        # backward instead of the input and int64 indices (autobuild.ops.pool).
        return max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                          pool.ceil_mode)
    return pool(x)


class ParameterFreeLayer(nn.Module):
    """A pool, optionally followed by a conv (a 1x1 channel map, or the stride-1 conv of the
    hybrid layout). Replaces one Conv2d call; the BN/activation after it stay where they are."""

    #: autobuild.masked(): the layer outputs zeros (the replaced conv's output is off).
    masked: bool = False

    def __init__(self, pool: nn.Module, conv: nn.Conv2d | None = None,
                 pad: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.pool = pool
        self.conv = conv
        #: Explicit -inf padding (H, W) for dilated sites, where MaxPool2d refuses a padding
        #: over half its (undilated) kernel; -inf is what MaxPool2d's own padding means.
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        if self.masked:
            return torch.zeros_like(self._forward(x))
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.pad != (0, 0):
            ph, pw = self.pad
            x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
        if self.conv is not None:
            return self.conv(run_pool(self.pool, x))
        # A lone identity must not hand back its input: an in-place activation after it
        # (torchvision's ReLU(inplace=True)) would overwrite a tensor autograd saved.
        return x.clone() if isinstance(self.pool, nn.Identity) else run_pool(self.pool, x)

    def extra_repr(self) -> str:
        return f"pad={self.pad}" if self.pad != (0, 0) else ""


class TokenPoolLayer(nn.Module):
    """PfLayer's efficient layer in place of a self-attention, on (B, N, C) tokens:
    ``proj(GELU(pool(GELU(qkv(x)))))`` where the pool runs over the tokens laid out on their
    square grid. The ``prefix`` tokens before the grid (a class token) skip the pool: they get
    the same token-wise Linear-GELU-GELU-Linear (PfLayer's own ViT has no class token).
    The Linear layers keep PfLayer's names (``qkv``, ``proj``) and initialisation (truncated
    normal, std 0.02, zero bias)."""

    #: autobuild.masked(): the layer outputs zeros (the attention branch is off).
    masked: bool = False

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *, pool: str = "max",
                 kernel: int = 3, prefix: int = 0, bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.prefix = prefix
        self.qkv = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        # Stride 1 and "same" padding: the grid keeps its size (PfLayer: MaxPool2d(3, 1, 1)).
        self.pool = make_pool(pool, kernel, 1, kernel // 2, channels=hidden)
        self.proj = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.proj_drop = nn.Dropout(drop)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.qkv, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                lin.bias.zero_()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, **_: object) -> Tensor:
        # Called where the attention was, with its keyword arguments (timm passes
        # attn_mask=None, is_causal=False); a pool over the grid cannot honour a mask.
        if attn_mask is not None:
            raise AutobuildError("TokenPoolLayer replaces a self-attention and cannot apply "
                                 "an attention mask; keep that attention (do not convert it)")
        if self.masked:
            return x.new_zeros(*x.shape[:-1], self.proj.out_features)
        y = self._pool_grid(self.act(self.qkv(x)))
        return self.proj_drop(self.proj(self.act(y)))

    def _pool_grid(self, y: Tensor) -> Tensor:
        if isinstance(self.pool, nn.Identity):
            return y
        b, n, c = y.shape
        side = grid_side(n, self.prefix)
        if side is None:
            raise AutobuildError(f"TokenPoolLayer: {n} tokens minus {self.prefix} prefix "
                                 "tokens is not a square grid")
        p = self.prefix
        grid = y[:, p:].transpose(1, 2).reshape(b, c, side, side)
        grid = run_pool(self.pool, grid).flatten(2).transpose(1, 2)
        return torch.cat([y[:, :p], grid], dim=1) if p else grid

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}"


def grid_side(tokens: int, prefix: int) -> int | None:
    """The side of the square grid of ``tokens - prefix`` tokens (None when not square)."""
    n = tokens - prefix
    side = math.isqrt(max(n, 0))
    return side if n > 0 and side * side == n else None


def auto_prefix(tokens: int) -> int:
    """Tokens before the grid when it is the largest square that fits (1 for a ViT's 197)."""
    return tokens - math.isqrt(tokens) ** 2
