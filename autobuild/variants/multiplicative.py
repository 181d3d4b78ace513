"""multiplicative: QLNet's quadratic-linear blocks (Yao Liu, "QLNet", arXiv 2308.01621).

Site: a residual block (``layout=plain``) or the whole torchvision ResNet
(``layout=qlnet``). The QL block has no ReLU anywhere; the product is the nonlinearity:

    y   = BN1(Conv1x1(x))                  inplanes -> 2*width
    y   = y[:, :width] * y[:, width:]
    y   = BN2(DWConv3x3_stride_s(y))       depthwise
    y   = BN3(Conv1x1(y))                  -> outplanes, BN3.gamma = 0 at init
    out = skip(x) + y                      skip = identity, or 1x1 conv (stride s) + BN
    out = hardball(out)                    first block of stages 2-4

hardball(x) = x where ||x|| <= r, else r·x/||x||, the norm over channels at each pixel and
r = sqrt(C). It is computed as x · r / sqrt(max(||x||², r²)), so the backward pass never
divides by a norm below r (a pixel whose channel vector is exactly 0 is harmless).

Width. QLNet uses width = 4·inplanes while inplanes <= 256, else 2·inplanes, in a network
with expansion 1 (the residual stream is as wide as the block). A plain conversion applies
the same rule to the block's *narrowest* width: min(input channels, fewest output channels
of any conv inside the block). On basic-block ResNets that is exactly QLNet's inplanes
(plain resnet34 gets QLNet-10m's blocks, parameter for parameter); on bottleneck ResNets
it is the bottleneck width, i.e. the stream width of the QLNet that has the same stages.
Because a bottleneck's stream is 4x wider than that, resnet50's converted blocks cost more
than its bottlenecks; ``--option expansion=K`` sets width = K x that same basis instead
(K=1 is about cost-neutral on resnet50).

Hardball placement. QLNet puts it after the first block of stages 2-4, which are its
blocks with a skip conv and stride 2. In a plain conversion "a skip conv" also matches
blocks that only change the channel count (resnet50's layer1.0, 64 -> 256), which are not
where the paper puts it, so the default ``hardball=downsample`` picks the blocks with
stride > 1 (in every ResNet, the first block of each stage after the first);
``hardball=skip`` picks every block with a skip conv, ``hardball=none`` none.

``layout=qlnet`` rebuilds a torchvision ResNet as QLNet: the ResNet stem (conv 7x7,
BN, ReLU, max-pool), widths 64/128/256/512 with the baseline's number of blocks per stage
(resnet50/resnet34: [3, 4, 6, 3], the paper's qlnet-10m: 10.06M params, 2.42 GMACs at
224x224), expansion 1, a hardball before the pooling head, kaiming-normal (fan_out,
linear) initialisation, and the baseline's number of classes.

Continuous symmetry (paper, section on symmetry): with BN folded into the convs, a stage's
residual stream can be rotated by any orthogonal Q — its writers (every conv3, and the skip
conv that opens the stage) multiplied by Q, its readers (the next conv1s, the next skip
conv, the classifier) by Qᵀ — without changing the output, because identity skips carry
Q through and hardball (a function of the per-pixel norm) commutes with it.
:func:`symmetry_transform` applies it, :func:`check_symmetry` measures it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from autobuild.errors import AutobuildError
from autobuild.ops.common import bn_trains, fused_ok
from autobuild.ops.multiplicative import ql_branch_train
from autobuild.rewrite import Counts, Option, Site, Variant, plan_of, register_family, root_of
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["Hardball", "MultiplicativeVariant", "QLBlock", "QLNet", "check_symmetry",
           "ql_width", "symmetry_transform"]

LAYOUTS = ("plain", "qlnet")
#: Training backward of the QL branch: "default" keeps the BN inputs (z, the product, the
#: depthwise output); "save" keeps only the block input and recomputes the branch.
MEMORY_MODES = ("default", "save")
HARDBALL_PLACEMENTS = ("downsample", "skip", "none")
#: QLNet's stage widths (the residual stream, expansion 1).
QLNET_WIDTHS = (64, 128, 256, 512)


# ---- layers ---------------------------------------------------------------------------------
class Hardball(nn.Module):
    """Project each pixel's channel vector into the ball of radius sqrt(C) (QLNet)."""

    def forward(self, x: Tensor) -> Tensor:
        r2 = float(x.shape[1])
        sq = (x * x).sum(dim=1, keepdim=True)
        # r / max(||x||, r): 1 inside the ball, r/||x|| outside. Clamping the *squared* norm
        # at r² keeps rsqrt away from 0, so no 0/0 reaches the backward pass.
        return x * (math.sqrt(r2) * torch.rsqrt(sq.clamp_min(r2)))


def ql_width(basis: int, expansion: str | float = "qlnet") -> int:
    """QLNet's rule (4·basis while basis <= 256, else 2·basis), or ``expansion``·basis."""
    if expansion == "qlnet":
        return 4 * basis if basis <= 256 else 2 * basis
    return max(1, round(float(expansion) * basis))


def _kaiming_linear(conv: nn.Conv2d) -> None:
    # QLNet's init: no ReLU follows any conv inside a block, hence the 'linear' gain.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="linear")


class QLBlock(nn.Module):
    """One QL block (SPEC 1.2 / QLNet): conv1x1 -> product -> depthwise 3x3 -> conv1x1."""

    #: autobuild.masked(): the residual branch is off, the block is its skip path.
    masked: bool = False

    def __init__(self, inplanes: int, outplanes: int, width: int, stride: int = 1,
                 hardball: bool = False) -> None:
        super().__init__()
        self.inplanes, self.outplanes, self.width, self.stride = inplanes, outplanes, width, stride
        self.conv1 = nn.Conv2d(inplanes, 2 * width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or inplanes != outplanes:
            self.skip = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                                      nn.BatchNorm2d(outplanes))
        self.hardball: nn.Module = Hardball() if hardball else nn.Identity()
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
                _kaiming_linear(m)
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
                f"hardball={isinstance(self.hardball, Hardball)}{memory}")


def _with_memory(module: nn.Module, memory: str) -> nn.Module:
    """Set every QL block's memory mode (an attribute: the state_dict is unchanged)."""
    for m in module.modules():
        if isinstance(m, QLBlock):
            m.memory = memory
    return module


def _wants_hardball(placement: str, stride: int, skip_conv: bool) -> bool:
    return (placement == "downsample" and stride > 1) or (placement == "skip" and skip_conv)


class QLNet(nn.Module):
    """QLNet (arXiv 2308.01621): the ResNet stem, four stages of QL blocks (expansion 1),
    a hardball before global average pooling, and a linear classifier."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000,
                 in_chans: int = 3, expansion: str | float = "qlnet",
                 hardball: str = "downsample") -> None:
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
                                      _wants_hardball(hardball, stride, skip)))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.hardball = Hardball()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _kaiming_linear(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.hardball(x))
        return self.fc(torch.flatten(x, 1))


# ---- the family -----------------------------------------------------------------------------
def _block_basis(site: Site, module: nn.Module) -> int:
    """The block's narrowest width: min(input channels, fewest outputs of any inner conv)."""
    outs = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    return min([site.in_channels, *outs]) if outs else site.in_channels


def _block_stride(site: Site) -> int:
    """Stride from the shapes, rounding up (a stride-2 block maps 7x7 to 4x4)."""
    if len(site.input_shape) != 3 or len(site.output_shape) != 3:
        raise AutobuildError(f"site {site.name} is not a 2-d feature-map block (shapes "
                             f"{site.input_shape} -> {site.output_shape}); choose conv blocks")
    return max(1, -(-site.input_shape[-1] // site.output_shape[-1]))


def _parse_expansion(value: Any) -> str | float:
    if value == "qlnet":
        return "qlnet"
    try:
        k = float(value)
    except (TypeError, ValueError):
        k = -1.0
    if not k > 0 or math.isinf(k):
        raise AutobuildError(f"option expansion={value!r} of multiplicative must be 'qlnet' or "
                             "a positive number K (width = K x the block's narrowest width)")
    return k


class MultiplicativeVariant(Variant):
    name = "multiplicative"
    summary = "QLNet quadratic-linear blocks (product nonlinearity, no ReLU, hardball)"
    paper = "QLNet (Yao Liu, arXiv 2308.01621)"
    site_kinds = ("block", "network")
    options = (
        Option("layout", "plain", "plain: convert residual blocks in place (same in/out "
               "channels and stride); qlnet: rebuild a torchvision ResNet as QLNet", LAYOUTS),
        Option("hardball", "downsample", "which blocks end with a hardball: downsample "
               "(stride > 1, the paper's first block of stages 2-4), skip (every block with a "
               "skip conv) or none", HARDBALL_PLACEMENTS),
        Option("expansion", "qlnet", "block width: 'qlnet' (4x the block's narrowest width, "
               "2x above 256) or a number K (K x that width)", type=float, min=0.0, max=16.0,
               min_inclusive=False, specials=("qlnet",)),
        Option("memory", "default", "training backward of each QL block: 'default' keeps the "
               "branch's BN inputs; 'save' keeps only the block input and recomputes the branch "
               "(about the baseline's memory, one more conv1 and depthwise conv)",
               MEMORY_MODES),
    )
    # A QL block replaces a whole block: it cannot compute a basic/bottleneck block's function.
    inits = ("scratch",)
    primary_option = "layout"
    leaf_modules = (QLBlock, Hardball)
    mask_effect = "the residual branch of each QL block: the block computes hardball(skip(x))"
    example_models = ("cifar_resnet20", "resnet18", "resnet50", "resnet34")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = [
            ("cifar_resnet20", {"layout": "plain", "hardball": h}, None)
            for h in HARDBALL_PLACEMENTS]
        # layout=qlnet needs a torchvision ResNet; resnet18 gives the cheapest QLNet ([2]*4).
        return cases + [("resnet18", {"layout": "qlnet"}, None)]

    def parse_options(self, raw: Any) -> dict[str, Any]:
        options = super().parse_options(raw)
        _parse_expansion(options["expansion"])  # refuse a bad width rule up front
        return options

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        return site.kind == ("network" if options["layout"] == "qlnet" else "block")

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["layout"] == "qlnet":
            from torchvision.models.resnet import ResNet

            module = analysis.module(site)
            if not isinstance(module, ResNet):
                return (f"layout=qlnet rebuilds a torchvision ResNet (e.g. resnet50), not a "
                        f"{type(module).__name__}; use --option layout=plain")
            return ""
        if len(site.input_shape) != 3 or len(site.output_shape) != 3:
            return (f"it is not a 2-d feature-map block (shapes {site.input_shape} -> "
                    f"{site.output_shape})")
        stride = _block_stride(site)
        h, w = site.input_shape[1:]
        if ((h - 1) // stride + 1, (w - 1) // stride + 1) != tuple(site.output_shape[1:]):
            return (f"it maps {site.input_shape} to {site.output_shape}, which a stride-{stride} "
                    "3x3 conv cannot reproduce")
        return ""

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """Every block; a module that is itself one block holding another (a one-block
        stage) yields to the inner one, so no block is converted twice."""
        names = [s.name for s in candidates]
        return [s for s in candidates
                if not any(n != s.name and n.startswith(s.name + ".") for n in names)]

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        if options["layout"] == "qlnet":
            return analysis.applied_cost(self, site, options)
        with torch.device("meta"):
            block = self.build(site, analysis.meta_module(site), options, "scratch")
        return count_replacement(block, site.input_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        if options["layout"] == "qlnet":
            expansion = _parse_expansion(options["expansion"])
            model = self._qlnet(rewriter.root_module, expansion, options["hardball"])
            rewriter.set_root(site, _with_memory(model, options.get("memory", "default")),
                              note="QLNet layout")
            return
        rewriter.replace(site, self.build(site, rewriter.module(site), options, init))

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        stride = _block_stride(site)
        skip = stride != 1 or site.in_channels != site.out_channels
        width = ql_width(_block_basis(site, module), _parse_expansion(options["expansion"]))
        block = QLBlock(site.in_channels, site.out_channels, width, stride,
                        _wants_hardball(options["hardball"], stride, skip))
        _with_memory(block, options.get("memory", "default"))
        param = next(module.parameters(), None)
        return block.to(param.device, param.dtype) if param is not None else block

    @staticmethod
    def _qlnet(root: nn.Module, expansion: str | float, placement: str) -> QLNet:
        layers = [len(getattr(root, f"layer{i}")) for i in range(1, 5)]
        model = QLNet(layers, root.fc.out_features, root.conv1.in_channels, expansion, placement)
        return model.to(root.fc.weight.device, root.fc.weight.dtype)


# ---- the continuous symmetry ----------------------------------------------------------------
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode BN as one conv with a bias (always with a bias: the
    rotation writes it)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval())


@torch.no_grad()
def _fold_block(block: QLBlock) -> None:
    block.conv1, block.bn1 = _fold(block.conv1, block.bn1), nn.Identity()
    block.conv2, block.bn2 = _fold(block.conv2, block.bn2), nn.Identity()
    block.conv3, block.bn3 = _fold(block.conv3, block.bn3), nn.Identity()
    if block.has_skip_conv:
        block.skip = nn.Sequential(_fold(block.skip[0], block.skip[1]), nn.Identity())


#: Ops a rotation of the channels passes through unchanged (they act per channel, or on
#: the per-pixel norm, or only reshape when the spatial size is 1).
_EQUIVARIANT_MODULES = (Hardball, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_EQUIVARIANT_CALLS = {torch.flatten, "flatten", "view", "reshape", "contiguous"}
_HARMLESS_CALLS = {"size", "dim"}


@dataclass
class _Stream:
    """One stage's residual stream: who writes it and who reads it."""

    start: str
    channels: int
    writers: list[nn.Conv2d] = field(default_factory=list)
    readers: list[nn.Module] = field(default_factory=list)


def _stream(gm: fx.GraphModule, start: fx.Node) -> _Stream | None:
    """Follow the stream a skip-conv QL block opens to everything that reads it; None when
    something that does not commute with a rotation (a ReLU, the network output) reads it."""
    block: QLBlock = gm.get_submodule(start.target)
    s = _Stream(str(start.target), block.outplanes, [block.skip[0], block.conv3])
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            target = user.target
            if user.op == "call_module":
                m = gm.get_submodule(target)
                if isinstance(m, QLBlock) and not m.has_skip_conv:  # same stream, continues
                    s.readers.append(m.conv1)
                    s.writers.append(m.conv3)
                    todo.append(user)
                elif isinstance(m, QLBlock):  # opens the next stream: reads this one
                    s.readers += [m.conv1, m.skip[0]]
                elif isinstance(m, _EQUIVARIANT_MODULES):
                    todo.append(user)
                elif isinstance(m, nn.Linear) and m.in_features == s.channels:
                    s.readers.append(m)
                elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == s.channels:
                    s.readers.append(m)
                else:
                    return None
            elif user.op in ("call_function", "call_method") and target in _EQUIVARIANT_CALLS:
                todo.append(user)
            elif user.op in ("call_function", "call_method") and target in _HARMLESS_CALLS:
                continue
            else:
                return None
    return s


def _orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@torch.no_grad()
def _rotate(weight: Tensor, q: Tensor, *, side: str) -> Tensor:
    w = weight.double()
    out = (torch.einsum("oi,i...->o...", q, w) if side == "out"      # writer: Q·W
           else torch.einsum("oi...,ji->oj...", w, q))              # reader: W·Qᵀ
    return out.to(weight.dtype)


def _streams(model: nn.Module, leaf_modules: Sequence[Any]) -> tuple[list[_Stream], int]:
    from autobuild.rewrite.trace import trace

    gm = trace(model, leaf_modules=leaf_modules)
    starts, n_blocks = [], 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QLBlock):
            n_blocks += 1
            if gm.get_submodule(node.target).has_skip_conv:
                starts.append(node)
    streams = [s for s in (_stream(gm, n) for n in starts) if s is not None]
    return streams, n_blocks


def symmetry_transform(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """A new model computing the same function (eval mode): BN folded into the QL blocks'
    convs, then each stage's residual stream rotated by a random orthogonal Q (seeded).

    Stages whose stream reaches something that does not commute with a rotation (the
    stream after the ResNet stem's ReLU, a non-QL block, the output itself) keep Q = I.
    The result has folded convs, so it no longer matches its plan's state_dict.
    """
    return _symmetry(model, seed)[0]


@torch.no_grad()
def _symmetry(model: nn.Module, seed: int) -> tuple[nn.Module, int]:
    new = copy.deepcopy(model).eval()
    plan = plan_of(model)
    root = root_of(new)
    blocks = [m for m in root.modules() if isinstance(m, QLBlock)]
    if not blocks:
        raise AutobuildError("the model has no QL blocks: convert it with --to multiplicative "
                             "before checking the QLNet symmetry")
    for b in blocks:
        _fold_block(b)
    streams, _ = _streams(root, list(plan.leaf_modules) if plan is not None else [])
    generator = torch.Generator().manual_seed(seed)
    for s in streams:
        q = _orthogonal(s.channels, generator)
        for conv in s.writers:
            conv.weight.copy_(_rotate(conv.weight, q, side="out"))
            conv.bias.copy_(_rotate(conv.bias, q, side="out"))
        for m in s.readers:
            m.weight.copy_(_rotate(m.weight, q, side="in"))
    return new, len(streams)


@torch.no_grad()
def check_symmetry(model: nn.Module, *, seed: int = 0,
                   input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Compare the logits of ``model`` and :func:`symmetry_transform` (model) in eval mode on
    one random input; ``relative`` = max |difference| / max |output|."""
    if input_size is None:
        plan = plan_of(model)
        if plan is None or plan.input_size is None:
            raise AutobuildError("check_symmetry needs input_size for a model without a plan")
        input_size = plan.input_size
    from autobuild.summary import output_difference

    rotated, stages = _symmetry(model, seed)
    diff, scale = output_difference(model, rotated, input_size, seed=seed)
    return {"max_abs_diff": diff, "max_abs_output": scale, "relative": diff / max(scale, 1e-12),
            "stages": stages, "seed": seed}


register_family(MultiplicativeVariant)
