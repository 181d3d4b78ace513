"""pde-global: residual stages condensed into one block plus a PDE "Global layer" (Kag &
Saligrama, "Condensing CNNs with Partial Differential Equations", CVPR 2022; official code
anilkagak2/PDE_GlobalLayer, ``global_layer.py`` / ``model.py``).

The Global layer solves, on each channel of a feature map h,

    ∂H/∂t = ∇·(D ∇H) + ∇·(v H) + f,     H^-1 = f, H^0 = h,

for K explicit steps (default K=1, dt=0.2, dx=dy=1) with the official three-level scheme
(diffusion DuFort-Frankel style, advection by central differences), on a periodic domain:
``torch.roll`` over the two spatial axes only, never the channels. With A = v·dt/dx,
B = D·dt/dx², E = (∂u/∂x + ∂v/∂y)·dt (x is the height axis, as in the official code)::

    H^{k+1} = [ (1-2Bx-2By)·H^{k-1} - 2E·H^k + (2Bx-Ax)·H^k[i-1,j] + (2Bx+Ax)·H^k[i+1,j]
                + (2By-Ay)·H^k[i,j-1] + (2By+Ay)·H^k[i,j+1] + 2·dt·f ] / (1 + 2Bx + 2By)

and the layer returns ReLU(BN(H^K)). The coefficients (``--option coeffs=...``):

  dwconv                velocity (u, v) and diffusivity (Dx, Dy) are each a depthwise 3x3
                        conv + BN + ReLU of h (the official default, ``--non_linear``);
  constant              Dx = Dy = 1 (the official cDx = cDy = 1) and u = v = 0: diffusion
                        with a source, the layer's only weights are its output BN;
  constant_diffusivity  the official ``--constant_Dxy``: learned velocity, Dx = Dy = 1.

Layouts (``--option layout=...``):

  plain  (default) Site: a residual stage. The stage keeps its first block and a Global
         layer replaces the remaining blocks, on any ResNet: the stage becomes
         Sequential(0=first block, pde=GlobalLayer). A one-block stage gets the
         Global layer appended (the result is always "first block + Global", the layout
         the official code builds with -m 1). Blocks after the first keep the channel
         count and resolution in every ResNet, so the Global layer runs on the first
         block's output.
  paper  Site: the whole network of a CIFAR ResNet (``cifar_resnet*``). Builds the
         official ResNet-Global (``pdenet``, -m 1 --n1 16 --n2 32 --n3 64 --n4 64):
         3x3 stem, four stages of 16/32/64/64 channels with strides 1/2/2/2, ``blocks``
         torchvision BasicBlocks each (1x1 conv + BN projection shortcuts), a Global layer
         after stages 1-3, average pooling and a Linear head with the baseline's classes.
         Counts at 32x32: 161K params / 14.8M MACs for the official code (measured here:
         161,402 / 14.8M); the paper reports 168K / 15M (ResNet-32: 473K / 70M).

Deliberate differences from the official code: the coefficient BNs use the default eps
(the official ``norm_layer(planes, planes)`` sets eps = the channel count, a slip); the
division by 1 + 2Bx + 2By is a division, not a product with its reciprocal, so that
autobuild.count sees every stencil FLOP (aten.roll moves data and costs 0).
Only ``--init scratch`` exists: a Global layer cannot reproduce the blocks it replaces.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.ops.batchnorm import bn_train_args
from autobuild.ops.common import NoAutocast, autocast_dtype, bn_trains, fused_ok
from autobuild.ops.pde import global_pde
from autobuild.rewrite import Counts, Option, Region, Site, Variant, register_family
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["COEFFS", "LAYOUTS", "GlobalLayer", "PdeGlobalVariant", "ResNetGlobal", "pde_steps"]

COEFFS = ("dwconv", "constant", "constant_diffusivity")
LAYOUTS = ("plain", "paper")
#: Channels of the four stages of the official CIFAR ResNet-Global.
PAPER_WIDTHS = (16, 32, 64, 64)


def pde_steps(f: Tensor, h: Tensor, u: Tensor | None, v: Tensor | None,
              diff_x: Tensor | float, diff_y: Tensor | float, steps: int, dt: float,
              dx: int = 1, dy: int = 1) -> Tensor:
    """``steps`` steps of the official three-level scheme from H^-1 = f, H^0 = h (see the
    module docstring); ``u``/``v`` None means zero velocity. Tensors are (N, C, H, W)."""
    bx2 = diff_x * (2 * dt / dx ** 2)  # 2·Bx
    by2 = diff_y * (2 * dt / dy ** 2)
    denom = 1 + bx2 + by2
    c_prev = 1 - bx2 - by2
    src = f * (2 * dt)
    if u is not None and v is not None:
        ax, ay = u * (dt / dx), v * (dt / dy)
        # 2E = 2·(∂u/∂x + ∂v/∂y)·dt, with the official (rolled) central differences.
        e2 = ((torch.roll(u, dx, -2) - torch.roll(u, -dx, -2)) * (dt / dx)
              + (torch.roll(v, dy, -1) - torch.roll(v, -dy, -1)) * (dt / dy))
    h_prev = f
    for _ in range(steps):
        # Periodic borders: roll over the spatial axes only (-2 = x/height, -1 = y/width).
        xp, xm = torch.roll(h, dx, -2), torch.roll(h, -dx, -2)  # H[i-1, j], H[i+1, j]
        yp, ym = torch.roll(h, dy, -1), torch.roll(h, -dy, -1)  # H[i, j-1], H[i, j+1]
        rhs = c_prev * h_prev + bx2 * (xp + xm) + by2 * (yp + ym) + src
        if u is not None and v is not None:
            rhs = rhs - e2 * h + ax * (xm - xp) + ay * (ym - yp)
        h_prev, h = h, rhs / denom
    return h


class DepthwiseCoefficient(nn.Module):
    """A PDE coefficient field: ReLU(BN(depthwise 3x3 conv(h)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(h)))


class GlobalLayer(nn.Module):
    """Kag & Saligrama's Global layer (``GlobalFeatureBlock_Diffusion`` of the official code,
    with its defaults: identity init block, no residual, H^-1 = f)."""

    #: autobuild.masked(): the layer is the identity (its stage is just its first block).
    masked: bool = False

    def __init__(self, channels: int, steps: int = 1, dt: float = 0.2, coeffs: str = "dwconv",
                 dx: int = 1, dy: int = 1) -> None:
        super().__init__()
        if coeffs not in COEFFS:
            raise AutobuildError(f"unknown Global-layer coeffs {coeffs!r}; valid: "
                                 f"{', '.join(COEFFS)}")
        if steps < 1 or not dt > 0:
            raise AutobuildError(f"the Global layer needs K >= 1 and dt > 0 (got K={steps}, "
                                 f"dt={dt})")
        self.channels, self.steps, self.dt, self.coeffs = channels, steps, dt, coeffs
        self.dx, self.dy = dx, dy
        learned_velocity = coeffs in ("dwconv", "constant_diffusivity")
        self.u = DepthwiseCoefficient(channels) if learned_velocity else None
        self.v = DepthwiseCoefficient(channels) if learned_velocity else None
        self.diff_x = DepthwiseCoefficient(channels) if coeffs == "dwconv" else None
        self.diff_y = DepthwiseCoefficient(channels) if coeffs == "dwconv" else None
        self.bn_out = nn.BatchNorm2d(channels)

    def _coefficients(self) -> list[DepthwiseCoefficient | None]:
        return [self.u, self.v, self.diff_x, self.diff_y]

    def _fused(self, f: Tensor) -> Tensor:
        """Training: the coefficients' BN + ReLU and the PDE steps as one Function that
        keeps f, the coefficient conv outputs and H_K (autobuild.ops.pde)."""
        coefficients, bn_conf = [], []
        for m in self._coefficients():
            if m is None:
                continue
            y = m.conv(f)
            rm, rv, momentum = bn_train_args(m.bn, y.shape)
            coefficients.append((y, m.bn.weight, m.bn.bias, rm, rv))
            bn_conf.append((momentum, m.bn.eps))
        dev = f.device.type
        with NoAutocast(dev, autocast_dtype(dev) is not None):
            h = global_pde(f, tuple(m is not None for m in self._coefficients()), self.steps,
                           self.dt, self.dx, self.dy, coefficients, bn_conf)
        return torch.relu(self.bn_out(h))

    def forward(self, f: Tensor) -> Tensor:
        if self.masked:
            return f
        coefficients = [m for m in self._coefficients() if m is not None]
        if fused_ok(None, f, *(p for m in coefficients for p in m.parameters())) and all(
                bn_trains(m.bn) and type(m.conv) is nn.Conv2d for m in coefficients):
            return self._fused(f)
        h = f  # the official default init block is the identity: H^0 = h = f
        u = self.u(h) if self.u is not None else None
        v = self.v(h) if self.v is not None else None
        # Constant diffusivity: the official cDx = cDy = 1.
        diff_x = self.diff_x(h) if self.diff_x is not None else 1.0
        diff_y = self.diff_y(h) if self.diff_y is not None else 1.0
        h = pde_steps(f, h, u, v, diff_x, diff_y, self.steps, self.dt, self.dx, self.dy)
        return torch.relu(self.bn_out(h))

    def extra_repr(self) -> str:
        return f"{self.channels}, K={self.steps}, dt={self.dt}, coeffs={self.coeffs}"


class ResNetGlobal(nn.Module):
    """The official CIFAR ResNet-Global (``model.pdenet``): four stages of ``blocks`` basic
    blocks with a Global layer after stages 1-3."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 widths: Sequence[int] = PAPER_WIDTHS, blocks: int = 1, steps: int = 1,
                 dt: float = 0.2, coeffs: str = "dwconv") -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.conv1 = nn.Conv2d(in_chans, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(w1, w1, blocks, 1)
        self.global1 = GlobalLayer(w1, steps, dt, coeffs)
        self.layer2 = _stage(w1, w2, blocks, 2)
        self.global2 = GlobalLayer(w2, steps, dt, coeffs)
        self.layer3 = _stage(w2, w3, blocks, 2)
        self.global3 = GlobalLayer(w3, steps, dt, coeffs)
        self.layer4 = _stage(w3, w4, blocks, 2)  # the official layer4 is strided as well
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)
        for m in self.modules():  # the official init: N(0, 2/(k·k·out)) convs, unit BNs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.global1(self.layer1(x))
        x = self.global2(self.layer2(x))
        x = self.global3(self.layer3(x))
        x = self.layer4(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    p = next(iter(reference.parameters()), None)
    return module.to(p.device, p.dtype) if p is not None else module


class PdeGlobalVariant(Variant):
    name = "pde-global"
    summary = "residual stages condensed to one block + a PDE Global layer (ResNet-Global)"
    paper = ("Kag & Saligrama, Condensing CNNs with Partial Differential Equations, CVPR 2022 "
             "(anilkagak2/PDE_GlobalLayer)")
    #: layout=paper converts the "network" site instead (see accepts()).
    site_kinds = ("stage",)
    options = (
        Option("layout", "plain", "plain: each stage keeps its first block + a Global layer; "
               "paper: the official CIFAR ResNet-Global (cifar_resnet* only)", LAYOUTS),
        Option("coeffs", "dwconv", "velocity/diffusivity: depthwise conv+BN+ReLU of h, "
               "constant (D=1, v=0), or constant_diffusivity (official --constant_Dxy)", COEFFS),
        Option("K", 1, "PDE steps per Global layer", None, int, min=1, max=100),
        Option("dt", 0.2, "PDE time step", None, float, min=0.0, min_inclusive=False),
        Option("blocks", 1, "basic blocks per stage of layout=paper (official -m: 1 = "
               "ResNet-32-Global, 2 = ResNet-56-Global)", None, int, min=1, max=64),
    )
    inits = ("scratch",)
    primary_option = "layout"
    leaf_modules = (GlobalLayer,)
    mask_effect = "the Global layer (it becomes the identity: the stage is its first block)"
    example_models = ("cifar_resnet20", "cifar_resnet32", "resnet18", "resnet50")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = [
            (self.example_models[0], {"coeffs": c}, None) for c in COEFFS]
        cases.append(("cifar_resnet32", {"layout": "paper"}, None))
        cases.append((self.example_models[0], {"K": 3, "dt": 0.1}, ["layer2"]))
        return cases

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        return site.kind == ("network" if options["layout"] == "paper" else "stage")

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["layout"] == "paper" and site.module_type != "CifarResNet":
            return (f"layout=paper builds the CIFAR ResNet-Global and replaces a cifar_resnet* "
                    f"baseline, not a {site.module_type}; use layout=plain for other ResNets")
        return ""

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str,
              analysis: Analysis) -> None:
        super().check(sites, options, init, analysis)
        if not math.isfinite(options["dt"]) or options["dt"] <= 0:
            raise InfeasiblePlacement(f"pde-global needs a finite dt > 0 (got dt="
                                      f"{options['dt']}); e.g. --option dt=0.2")
        if options["layout"] != "paper" and options["blocks"] != 1:
            raise InfeasiblePlacement("option blocks of pde-global applies to layout=paper "
                                      "only; add --option layout=paper or drop it")

    def region(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Region:
        """layout=plain replaces the stage's blocks after the first (which stays, and may
        itself be converted by another choice)."""
        if options["layout"] == "paper":
            return analysis.region(site.name)
        rest = [f"{site.name}.{child}" for child, _ in
                list(analysis.module(site).named_children())[1:]]
        return Region(frozenset().union(*(analysis.region(b).nodes for b in rest)),
                      frozenset(rest))

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        if options["layout"] == "paper":
            return analysis.applied_cost(self, site, options)
        with torch.device("meta"):
            layer = GlobalLayer(site.out_channels, options["K"], options["dt"],
                                options["coeffs"])
        return count_replacement(layer, site.output_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        steps, dt, coeffs = options["K"], options["dt"], options["coeffs"]
        if options["layout"] == "paper":
            root = rewriter.root_module
            net = ResNetGlobal(root.fc.out_features, root.conv1.in_channels,
                               blocks=options["blocks"], steps=steps, dt=dt, coeffs=coeffs)
            rewriter.set_root(site, _like(net, root), note="official CIFAR ResNet-Global")
            return
        stage = rewriter.module(site)
        first = next(iter(stage.children()))
        layer = _like(GlobalLayer(site.out_channels, steps, dt, coeffs), first)
        # Named "pde", not "global": fx generates Python code with child names in it.
        rewriter.replace(site, nn.Sequential(OrderedDict([("0", first), ("pde", layer)])),
                         note=f"block 0 kept, {len(stage) - 1} block(s) -> Global layer")


register_family(PdeGlobalVariant)
