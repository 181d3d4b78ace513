"""The parameter-free family's layers: the pool that replaces a spatial conv, and PfLayer's
efficient transformer layer that replaces a self-attention (naver-ai/PfLayer ``vit_pf.py``,
``EffLayer``): Linear -> GELU -> pool on the token grid -> GELU -> Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.pool import max_pool2d

__all__ = ["POOLS", "ParameterFreeLayer", "TokenPoolLayer", "auto_prefix", "grid_side",
           "make_pool", "run_pool"]

#: The parameter-free operations of PfLayer's layer study that autobuild builds.
POOLS = ("max", "avg", "identity")


def make_pool(op: str, kernel: int | tuple[int, int], stride: int | tuple[int, int],
              padding: int | tuple[int, int], dilation: int | tuple[int, int] = 1) -> nn.Module:
    """``op`` as a module. The average excludes the zero padding (a border output is the mean
    of the pixels it sees), so a constant map stays constant as it does under a max-pool."""
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
        self.pool = make_pool(pool, kernel, 1, kernel // 2)
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
