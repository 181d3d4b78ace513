"""QLNet's layers (the multiplicative family): the QL block, hardball and softball, the
shared-kernel depthwise conv, and the QLNet network. See ``multiplicative.py`` for the
formulas and the references."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.common import bn_trains, fused_ok
from autobuild.ops.multiplicative import ql_branch_train

__all__ = ["QLNET_WIDTHS", "Hardball", "QLBlock", "QLNet", "SharedDepthwiseConv2d", "Softball",
           "kaiming_linear", "make_ball", "ql_width", "wants_ball", "with_memory"]

#: QLNet's stage widths (the residual stream, expansion 1).
QLNET_WIDTHS = (64, 128, 256, 512)


class Hardball(nn.Module):
    """Project each pixel's channel vector into the ball of radius sqrt(C) (QLNet)."""

    def forward(self, x: Tensor) -> Tensor:
        r2 = float(x.shape[1])
        sq = (x * x).sum(dim=1, keepdim=True)
        # r / max(||x||, r): 1 inside the ball, r/||x|| outside. Clamping the *squared* norm
        # at r² keeps rsqrt away from 0, so no 0/0 reaches the backward pass.
        return x * (math.sqrt(r2) * torch.rsqrt(sq.clamp_min(r2)))


class Softball(nn.Module):
    """The smooth ball: x / sqrt(1 + ||x||²/r²), r² = C, the norm over channels at each pixel
    (the QLNet author's code, liuyao12/ConvNets-PDE-perspective ``softball``). Near 0 it is
    the identity, far out it maps onto the sphere of radius r; the denominator is >= 1."""

    def forward(self, x: Tensor) -> Tensor:
        sq = (x * x).sum(dim=1, keepdim=True)
        return x * torch.rsqrt(1.0 + sq / float(x.shape[1]))


def make_ball(kind: str) -> nn.Module:
    return Softball() if kind == "soft" else Hardball()


class SharedDepthwiseConv2d(nn.Module):
    """A depthwise 3x3 conv over ``channels`` channels with only ``kernels`` distinct
    kernels: channel c uses kernel c mod ``kernels`` (the QLNet author's ``conv_forward``:
    the kernel bank repeated over the channel groups). ``kernels`` x 9 weights instead of
    ``channels`` x 9."""

    def __init__(self, channels: int, kernels: int, stride: int = 1) -> None:
        super().__init__()
        if kernels < 1 or channels % kernels:
            raise AutobuildError(f"dw_kernels={kernels} must divide the depthwise width "
                                 f"{channels}")
        self.channels, self.kernels, self.stride = channels, kernels, stride
        self.weight = nn.Parameter(torch.empty(kernels, 1, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="linear")

    def full_weight(self) -> Tensor:
        return self.weight.repeat(self.channels // self.kernels, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.full_weight(), None, self.stride, 1, 1, self.channels)

    def to_conv(self) -> nn.Conv2d:
        """The same map as a plain depthwise Conv2d (each channel its own copy)."""
        conv = nn.Conv2d(self.channels, self.channels, 3, self.stride, 1, groups=self.channels,
                         bias=False).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.full_weight())
        return conv

    def extra_repr(self) -> str:
        return f"{self.channels}, kernels={self.kernels}, stride={self.stride}"


def ql_width(basis: int, expansion: str | float = "qlnet") -> int:
    """QLNet's rule (4·basis while basis <= 256, else 2·basis), or ``expansion``·basis."""
    if expansion == "qlnet":
        return 4 * basis if basis <= 256 else 2 * basis
    return max(1, round(float(expansion) * basis))


def kaiming_linear(conv: nn.Conv2d) -> None:
    # QLNet's init: no ReLU follows any conv inside a block, hence the 'linear' gain.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="linear")


class QLBlock(nn.Module):
    """One QL block (SPEC 1.2 / QLNet): conv1x1 -> product -> depthwise 3x3 -> conv1x1."""

    #: autobuild.masked(): the residual branch is off, the block is its skip path.
    masked: bool = False

    def __init__(self, inplanes: int, outplanes: int, width: int, stride: int = 1,
                 hardball: bool = False, *, ball: str = "hard", dw_kernels: int = 0) -> None:
        super().__init__()
        self.inplanes, self.outplanes, self.width, self.stride = inplanes, outplanes, width, stride
        self.conv1 = nn.Conv2d(inplanes, 2 * width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2: nn.Module = (
            SharedDepthwiseConv2d(width, dw_kernels, stride) if dw_kernels
            else nn.Conv2d(width, width, 3, stride, 1, groups=width, bias=False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or inplanes != outplanes:
            self.skip = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                                      nn.BatchNorm2d(outplanes))
        # Named hardball for the state_dict's sake; ball="soft" puts a Softball there.
        self.hardball: nn.Module = make_ball(ball) if hardball else nn.Identity()
        #: "default" or "save" (MEMORY_MODES); an attribute, not part of the state_dict.
        self.memory = "default"
        self.reset_parameters()

    @property
    def has_skip_conv(self) -> bool:
        return isinstance(self.skip, nn.Sequential)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_linear(m)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        # The block starts as its skip path: y = BN3(.) = 0 (QLNet, like zero-init residuals).
        self.bn3.weight.zero_()

    def _fusable(self, x: Tensor) -> bool:
        return (fused_ok(None, x, *self.parameters()) and bn_trains(self.bn1)
                and bn_trains(self.bn2) and all(type(c) is nn.Conv2d for c in (
                    self.conv1, self.conv2, self.conv3)))

    def forward(self, x: Tensor) -> Tensor:
        if self.masked:
            return self.hardball(self.skip(x))
        if self._fusable(x):
            # Training: fused ops keeping the BN inputs only, or (memory=save) the block
            # input only (autobuild.ops.multiplicative); same kernels, same outputs.
            y = self.bn3(ql_branch_train(self, x))
            return self.hardball(self.skip(x) + y)
        y = self.bn1(self.conv1(x))
        a, b = y.chunk(2, 1)  # [:w] and [w:]: the same views, one op
        y = self.bn2(self.conv2(a * b))
        y = self.bn3(self.conv3(y))
        return self.hardball(self.skip(x) + y)

    def extra_repr(self) -> str:
        memory = ", memory=save" if self.memory == "save" else ""
        return (f"{self.inplanes}, {self.outplanes}, width={self.width}, stride={self.stride}, "
                f"hardball={not isinstance(self.hardball, nn.Identity)}{memory}")


def with_memory(module: nn.Module, memory: str) -> nn.Module:
    """Set every QL block's memory mode (an attribute: the state_dict is unchanged)."""
    for m in module.modules():
        if isinstance(m, QLBlock):
            m.memory = memory
    return module


def wants_ball(placement: str, stride: int, skip_conv: bool) -> bool:
    return (placement == "all" or (placement == "downsample" and stride > 1)
            or (placement == "skip" and skip_conv))


class QLNet(nn.Module):
    """QLNet (arXiv 2308.01621): the ResNet stem, four stages of QL blocks (expansion 1),
    a hardball before global average pooling, and a linear classifier."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000,
                 in_chans: int = 3, expansion: str | float = "qlnet",
                 hardball: str = "downsample", *, ball: str = "hard",
                 dw_kernels: int = 0) -> None:
        super().__init__()
        if len(layers) != len(QLNET_WIDTHS):
            raise AutobuildError(f"QLNet has {len(QLNET_WIDTHS)} stages, got layers={layers}")
        self.conv1 = nn.Conv2d(in_chans, QLNET_WIDTHS[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(QLNET_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = QLNET_WIDTHS[0]
        for i, (planes, n) in enumerate(zip(QLNET_WIDTHS, layers, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                skip = stride != 1 or inplanes != planes
                # The width follows the block's *input* channels (QLNet's inplanes).
                blocks.append(QLBlock(inplanes, planes, ql_width(inplanes, expansion), stride,
                                      wants_ball(hardball, stride, skip), ball=ball,
                                      dw_kernels=dw_kernels))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.hardball = make_ball(ball)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        kaiming_linear(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.hardball(x))
        return self.fc(torch.flatten(x, 1))
