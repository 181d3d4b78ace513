"""The pde-global family's layers: the explicit scheme, the coefficient maps, the Global
layer and the official CIFAR ResNet-Global (see ``autobuild.variants.pde_global`` for the
formulas and the options that select these pieces)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from autobuild.errors import AutobuildError
from autobuild.ops.batchnorm import bn_train_args
from autobuild.ops.common import NoAutocast, autocast_dtype, bn_trains, fused_ok
from autobuild.ops.pde import global_pde

__all__ = ["ACTS", "BN_EPS", "COEFFS", "DIFFUSIVITIES", "H_PREV", "INIT_BLOCKS", "MAPS",
           "PAPER_WIDTHS", "VELOCITIES", "VELOCITY_FROM", "BasicDense", "Bottleneck1",
           "Coefficient", "GlobalLayer", "SeparableConv3x3", "basic_block",
           "canonical_widths", "coefficient_map", "parse_widths", "pde_steps", "resolve_coeffs"]

COEFFS = ("dwconv", "constant", "constant_diffusivity")
#: The maps a coefficient (or the init block) can be, by the official ``get_init_block``
#: names: ``dwconv`` is the official default coefficient conv (timm ``create_conv2d``,
#: depthwise 3x3, no bias); ``dwconv_bias`` is the official ``DwConv`` (nn.Conv2d, bias).
#: ``basicdense`` is the official ``BasicDense`` (DenseNet-Global's cell_type).
MAPS = ("dwconv", "identity", "basicblock", "bottleneck", "dwconv_bias", "pwconv", "fullconv",
        "basicdense")
#: ``isotropic``: the velocity half of the official ``use_dot``, one nonlinear field for
#: both axes, u = v = act(BN_u(conv_u g) · act(BN_v(conv_v g))); ``none``: no advection
#: (v = 0: diffusion only).
VELOCITIES = (*MAPS, "isotropic", "none")
#: ``isotropic``: the official ``use_dot`` form, one nonlinear field for both axes,
#: D = ReLU(BN_x(conv_x h) · ReLU(BN_y(conv_y h))); ``constant``: the official
#: ``--constant_Dxy`` (D = cDx = cDy = 1); ``none``: no diffusion (D = 0: advection only).
DIFFUSIVITIES = (*MAPS, "isotropic", "constant", "none")
#: The official ``cell_type``: the block that makes H^0 = init(f) (``identity``: H^0 = f).
INIT_BLOCKS = ("identity", "basicblock", "bottleneck", "dwconv_bias", "pwconv", "fullconv",
               "basicdense")
#: Coefficient batch-norm eps: ``channels`` is the official ``norm_layer(planes, planes)``
#: (eps = the channel count); ``1e-5`` is PyTorch's default.
BN_EPS = ("channels", "1e-5")
#: Channels of the four stages of the official CIFAR ResNet-Global (-m 1 --n1 16 --n2 32
#: --n3 64 --n4 64, the paper's ResNet-32-Global).
PAPER_WIDTHS = (16, 32, 64, 64)
#: The activation of the coefficient fields and of the output (official ``--use_silu``).
ACTS = ("relu", "silu")
#: What a Global layer can be built with: ACTS, and the activations of the official ImageNet
#: Global networks' blocks (ReLU6 in MobileNetV2, hard-swish in MobileNetV3), which the
#: official block takes from its network (``args['act_layer']``), not from a flag.
_ACT_LAYERS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU,
                                           "relu6": nn.ReLU6, "hardswish": nn.Hardswish}
#: H^-1 of the scheme: the layer input f, or H^0 = init_block(f) (official ``--init_h0_h``).
H_PREV = ("f", "init_block")
#: What the velocity is computed from: H^0 = init_block(f), or f (official ``--use_f_for_g``).
VELOCITY_FROM = ("h", "f")
#: The most channels a stage of layout=paper may have (a typo must not allocate gigabytes).
MAX_WIDTH = 4096


def parse_widths(text: str) -> tuple[int, ...]:
    """``"16/32/64/64"`` (or with commas, or spaces) -> (16, 32, 64, 64): the official
    --n1..--n4 (three numbers: the three-stage network of the official ``-o``/``--original``
    and of WideResnet-Global)."""
    try:
        widths = tuple(int(w) for w in str(text).replace(",", "/").split("/"))
    except ValueError:
        widths = ()
    if len(widths) not in (3, 4) or not all(1 <= w <= MAX_WIDTH for w in widths):
        raise AutobuildError(f"widths={text!r}: give 3 or 4 channel counts in [1, "
                             f"{MAX_WIDTH}] separated by '/', e.g. widths=16/32/64/64 (the "
                             f"official --n1..--n4) or widths=64/128/256 (WRN-40-4-Global)")
    return widths


def canonical_widths(text: str) -> str:
    """The one spelling of a ``widths`` value ("16/32/64/64"); '/' because a placement's
    short form ``family:name=value,...`` separates options with commas."""
    return "/".join(map(str, parse_widths(text)))


def pde_steps(f: Tensor, h: Tensor, u: Tensor | None, v: Tensor | None,
              diff_x: Tensor | float, diff_y: Tensor | float, steps: int, dt: float,
              dx: int = 1, dy: int = 1, source: bool = True,
              h_prev: Tensor | None = None) -> Tensor:
    """``steps`` steps of the official three-level scheme from H^-1 = ``h_prev`` (f by
    default), H^0 = h (see ``autobuild.variants.pde_global``); ``u``/``v`` None means zero
    velocity, a float diffusivity a constant one; ``source=False`` drops the 2·dt·f term
    (the official ``--no_f``). Tensors are (N, C, H, W)."""
    bx2 = diff_x * (2 * dt / dx ** 2)  # 2·Bx
    by2 = diff_y * (2 * dt / dy ** 2)
    denom = 1 + bx2 + by2
    c_prev = 1 - bx2 - by2
    src = f * (2 * dt) if source else 0.0
    if u is not None and v is not None:
        ax, ay = u * (dt / dx), v * (dt / dy)
        # 2E = 2·(∂u/∂x + ∂v/∂y)·dt, with the official (rolled) central differences.
        e2 = ((torch.roll(u, dx, -2) - torch.roll(u, -dx, -2)) * (dt / dx)
              + (torch.roll(v, dy, -1) - torch.roll(v, -dy, -1)) * (dt / dy))
    h_prev = f if h_prev is None else h_prev
    for _ in range(steps):
        # Periodic borders: roll over the spatial axes only (-2 = x/height, -1 = y/width).
        xp, xm = torch.roll(h, dx, -2), torch.roll(h, -dx, -2)  # H[i-1, j], H[i+1, j]
        yp, ym = torch.roll(h, dy, -1), torch.roll(h, -dy, -1)  # H[i, j-1], H[i, j+1]
        rhs = c_prev * h_prev + bx2 * (xp + xm) + by2 * (yp + ym) + src
        if u is not None and v is not None:
            rhs = rhs - e2 * h + ax * (xm - xp) + ay * (ym - yp)
        h_prev, h = h, rhs / denom
    return h


class Bottleneck1(nn.Module):
    """The official ``Bottleneck(planes, planes, expansion=1)``: 1x1 → 3x3 → 1x1 convs with
    BN (ReLU after the first two), identity skip, ReLU (torchvision's has expansion 4)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + x)


class SeparableConv3x3(nn.Module):
    """The official ``sep_conv3x3``: a depthwise 3x3 conv (carrying the stride) and a 1x1
    conv, no BN or activation between them, no biases (the official ``spatialConv`` and
    ``pointConv`` are ``depthwise`` and ``pointwise`` here)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


def basic_block(inplanes: int, planes: int, stride: int = 1,
                downsample: nn.Module | None = None, separable: bool = False) -> BasicBlock:
    """torchvision's BasicBlock, which is the official one; ``separable`` swaps its two 3x3
    convs for :class:`SeparableConv3x3` (the official ``--separable``)."""
    block = BasicBlock(inplanes, planes, stride, downsample)
    if separable:
        block.conv1 = SeparableConv3x3(inplanes, planes, stride)
        block.conv2 = SeparableConv3x3(planes, planes)
    return block


class BasicDense(nn.Module):
    """The official ``BasicDenseLayer(planes, bn_size=2)``: BN-ReLU-1x1 conv to 2·C-BN-ReLU-
    3x3 conv back to C, no skip (DenseNet-Global's init block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * channels)
        self.conv2 = nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


def coefficient_map(kind: str, channels: int, separable: bool = False,
                    kernel_size: int = 3) -> nn.Module:
    """One of :data:`MAPS` on ``channels`` channels (shape-preserving); ``separable``
    applies to ``basicblock`` (the official Bottleneck ignores it, so does ours);
    ``kernel_size`` to ``dwconv`` (the official ``dw_kernel_size``: 5 in some ImageNet
    Global blocks)."""
    if kind == "dwconv":
        return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=False)
    if kind == "dwconv_bias":
        return nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    if kind == "pwconv":
        return nn.Conv2d(channels, channels, 1)
    if kind == "fullconv":
        return nn.Conv2d(channels, channels, 3, padding=1)
    if kind == "basicblock":
        return basic_block(channels, channels, separable=separable)
    if kind == "bottleneck":
        return Bottleneck1(channels)
    if kind == "basicdense":
        return BasicDense(channels)
    if kind == "identity":
        return nn.Identity()
    raise AutobuildError(f"unknown Global-layer map {kind!r}; valid: {', '.join(MAPS)}")


def _activation(act: str) -> nn.Module:
    if act not in _ACT_LAYERS:
        raise AutobuildError(f"unknown Global-layer act {act!r}; valid: "
                             f"{', '.join(_ACT_LAYERS)}")
    return _ACT_LAYERS[act]()


class Coefficient(nn.Module):
    """A PDE coefficient field: act(BN(map(h))), act = ReLU unless ``act`` says otherwise;
    the map is a depthwise 3x3 conv by default (kept under the name ``conv`` whatever it
    is, so state_dicts stay stable)."""

    def __init__(self, channels: int, kind: str = "dwconv", eps: float = 1e-5,
                 act: str = "relu", separable: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = coefficient_map(kind, channels, separable, kernel_size)
        self.bn = nn.BatchNorm2d(channels, eps=eps)
        self.act = _activation(act)

    def pre(self, h: Tensor) -> Tensor:
        """The map's output, before the batch norm."""
        return self.conv(h)

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(h)))


#: Kept for code that imported the former name.
DepthwiseCoefficient = Coefficient


def resolve_coeffs(coeffs: str, velocity: str, diffusivity: str) -> tuple[str, str]:
    """The (velocity, diffusivity) that ``coeffs`` stands for; ``coeffs=dwconv`` leaves the
    two explicit choices as they are, the others set them (and refuse a contradiction)."""
    if coeffs not in COEFFS:
        raise AutobuildError(f"unknown Global-layer coeffs {coeffs!r}; valid: "
                             f"{', '.join(COEFFS)}")
    if coeffs == "dwconv":
        return velocity, diffusivity
    implied = ("none", "constant") if coeffs == "constant" else (velocity, "constant")
    if (coeffs == "constant" and (velocity, diffusivity) not in (("dwconv", "dwconv"), implied)
            or diffusivity not in ("dwconv", "constant")):
        raise AutobuildError(f"coeffs={coeffs} sets velocity={implied[0]}, diffusivity="
                             f"{implied[1]}; drop coeffs or the velocity/diffusivity options")
    return implied


class GlobalLayer(nn.Module):
    """Kag & Saligrama's Global layer (``GlobalFeatureBlock_Diffusion`` of the official code:
    H^-1 = f, H^0 = init_block(f)); see ``autobuild.variants.pde_global`` for the options."""

    #: autobuild.masked(): the layer is the identity (its stage is just its first block).
    masked: bool = False

    def __init__(self, channels: int, steps: int = 1, dt: float = 0.2, coeffs: str = "dwconv",
                 dx: int = 1, dy: int = 1, *, velocity: str = "dwconv",
                 diffusivity: str = "dwconv", init_block: str = "identity",
                 bn_eps: str = "channels", residual: bool = False, source: bool = True,
                 act: str = "relu", h_prev: str = "f", velocity_from: str = "h",
                 cdx: float = 1.0, cdy: float = 1.0, separable: bool = False,
                 kernel_size: int = 3) -> None:
        super().__init__()
        velocity, diffusivity = resolve_coeffs(coeffs, velocity, diffusivity)
        for name, value, valid in (("velocity", velocity, VELOCITIES),
                                   ("diffusivity", diffusivity, DIFFUSIVITIES),
                                   ("init_block", init_block, INIT_BLOCKS),
                                   ("bn_eps", bn_eps, BN_EPS), ("act", act, tuple(_ACT_LAYERS)),
                                   ("h_prev", h_prev, H_PREV),
                                   ("velocity_from", velocity_from, VELOCITY_FROM)):
            if value not in valid:
                raise AutobuildError(f"unknown Global-layer {name} {value!r}; valid: "
                                     f"{', '.join(valid)}")
        if (steps < 1 or not dt > 0 or dx < 1 or dy < 1 or not (cdx >= 0 and cdy >= 0)
                or kernel_size < 1 or kernel_size % 2 == 0):
            raise AutobuildError(f"the Global layer needs K >= 1, dt > 0, dx, dy >= 1, "
                                 f"cdx, cdy >= 0 and an odd kernel_size (got K={steps}, "
                                 f"dt={dt}, dx={dx}, dy={dy}, cdx={cdx}, cdy={cdy}, "
                                 f"kernel_size={kernel_size})")
        self.channels, self.steps, self.dt, self.coeffs = channels, steps, dt, coeffs
        self.dx, self.dy = dx, dy
        self.velocity, self.diffusivity, self.init_kind = velocity, diffusivity, init_block
        # The official --use_res (output + f) and --no_f (source=False).
        self.residual, self.source = bool(residual), bool(source)
        # The official --init_h0_h, --use_f_for_g, --cDx/--cDy (constant diffusivity only).
        self.h_prev, self.velocity_from = h_prev, velocity_from
        self.cdx, self.cdy = float(cdx), float(cdy)
        self.kernel_size = kernel_size  # of the dwconv coefficient maps
        # The official code's quirk: its coefficient BNs are norm_layer(planes, planes).
        eps = float(channels) if bn_eps == "channels" else 1e-5
        self.init_block = (None if init_block == "identity"
                           else coefficient_map(init_block, channels, separable))
        learned_v = velocity != "none"
        kind_v = "dwconv" if velocity == "isotropic" else velocity
        field = {"eps": eps, "act": act, "separable": separable, "kernel_size": kernel_size}
        self.u = Coefficient(channels, kind_v, **field) if learned_v else None
        self.v = Coefficient(channels, kind_v, **field) if learned_v else None
        learned_d = diffusivity not in ("constant", "none")
        kind_d = "dwconv" if diffusivity == "isotropic" else diffusivity
        self.diff_x = Coefficient(channels, kind_d, **field) if learned_d else None
        self.diff_y = Coefficient(channels, kind_d, **field) if learned_d else None
        self.bn_out = nn.BatchNorm2d(channels)
        self.act = _activation(act)
        self.act_name = act

    def _coefficients(self) -> list[Coefficient | None]:
        return [self.u, self.v, self.diff_x, self.diff_y]

    def _fused(self, f: Tensor) -> Tensor:
        """Training: the coefficients' BN + ReLU and the PDE steps as one Function that
        keeps f, the coefficient maps' outputs and H_K (autobuild.ops.pde)."""
        coefficients, bn_conf = [], []
        for m in self._coefficients():
            if m is None:
                continue
            y = m.pre(f)
            rm, rv, momentum = bn_train_args(m.bn, y.shape)
            coefficients.append((y, m.bn.weight, m.bn.bias, rm, rv))
            bn_conf.append((momentum, m.bn.eps))
        dev = f.device.type
        with NoAutocast(dev, autocast_dtype(dev) is not None):
            h = global_pde(f, tuple(m is not None for m in self._coefficients()), self.steps,
                           self.dt, self.dx, self.dy, coefficients, bn_conf)
        return torch.relu(self.bn_out(h))

    def _fusable(self, f: Tensor) -> bool:
        # The fused op starts from H^0 = H^-1 = f, has the source term, ReLU fields, one
        # field per coefficient and knows D ∈ {learned, 1}.
        if (self.init_block is not None or not self.source or self.act_name != "relu"
                or "isotropic" in (self.velocity, self.diffusivity)
                or self.diffusivity == "none"
                or (self.diffusivity == "constant" and (self.cdx, self.cdy) != (1.0, 1.0))):
            return False
        coefficients = [m for m in self._coefficients() if m is not None]
        return fused_ok(None, f, *(p for m in coefficients for p in m.parameters())) and all(
            bn_trains(m.bn) for m in coefficients)

    def _field_pair(self, a: Coefficient, b: Coefficient, x: Tensor,
                    isotropic: bool) -> tuple[Tensor, Tensor]:
        """The two fields of a coefficient pair; ``isotropic`` is the official ``use_dot``:
        one field act(BN_a(map_a x) · act(BN_b(map_b x))) for both axes."""
        if isotropic:
            field = self.act(a.bn(a.conv(x)) * b(x))
            return field, field
        return a(x), b(x)

    def forward(self, f: Tensor) -> Tensor:
        if self.masked:
            return f
        if self._fusable(f):
            out = self._fused(f)
            return out + f if self.residual else out
        return self.solve(f, self.init_block(f) if self.init_block is not None else f)

    def solve(self, f: Tensor, h: Tensor) -> Tensor:
        """The layer from a given H^0 = ``h`` (plain autograd): the coefficients, the K
        steps, act(BN(H^K)) and the residual."""
        u = v = None
        if self.u is not None and self.v is not None:
            g = f if self.velocity_from == "f" else h
            u, v = self._field_pair(self.u, self.v, g, self.velocity == "isotropic")
        diff_x: Tensor | float
        diff_y: Tensor | float
        if self.diff_x is not None and self.diff_y is not None:
            diff_x, diff_y = self._field_pair(self.diff_x, self.diff_y, h,
                                              self.diffusivity == "isotropic")
        elif self.diffusivity == "none":
            diff_x = diff_y = 0.0
        else:  # the official constant_Dxy: D = cDx, cDy (1 by default)
            diff_x, diff_y = self.cdx, self.cdy
        h = pde_steps(f, h, u, v, diff_x, diff_y, self.steps, self.dt, self.dx, self.dy,
                      self.source, h if self.h_prev == "init_block" else f)
        out = self.act(self.bn_out(h))
        return out + f if self.residual else out

    def extra_repr(self) -> str:
        return (f"{self.channels}, K={self.steps}, dt={self.dt}, velocity={self.velocity}, "
                f"diffusivity={self.diffusivity}, init={self.init_kind}, dx={self.dx}, "
                f"dy={self.dy}, residual={self.residual}, source={self.source}, "
                f"act={self.act_name}, h_prev={self.h_prev}, "
                f"velocity_from={self.velocity_from}")
