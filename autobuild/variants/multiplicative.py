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
``hardball=skip`` picks every block with a skip conv, ``hardball=all`` every block (the
author's first code put a softball after every block), ``hardball=none`` none.

Ball and depthwise variants, from the QLNet author's code (liuyao12/ConvNets-PDE-perspective
``resnet.py``): ``ball=soft`` puts softball(x) = x / sqrt(1 + ||x||²/C) where hardball
would go (and before the head of ``layout=qlnet``); ``dw_kernels=K`` makes the depthwise
conv share K 3x3 kernels among its channels (channel c uses kernel c mod K, the author's
``conv_forward``), K x 9 weights instead of width x 9 at the same MACs.

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

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.rewrite import Counts, Option, Site, Variant, register_family
from autobuild.variants._ql_layers import (
    QLNET_WIDTHS,
    Hardball,
    QLBlock,
    QLNet,
    SharedDepthwiseConv2d,
    Softball,
    ql_width,
    wants_ball,
    with_memory,
)
from autobuild.variants._ql_symmetry import check_symmetry, symmetry_transform
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["QLNET_WIDTHS", "Hardball", "MultiplicativeVariant", "QLBlock", "QLNet",
           "SharedDepthwiseConv2d", "Softball", "check_symmetry", "ql_width",
           "symmetry_transform"]

LAYOUTS = ("plain", "qlnet")
#: Training backward of the QL branch: "default" keeps the BN inputs (z, the product, the
#: depthwise output); "save" keeps only the block input and recomputes the branch.
MEMORY_MODES = ("default", "save")
HARDBALL_PLACEMENTS = ("downsample", "skip", "all", "none")
#: hard: hardball (x clipped to the ball of radius sqrt(C)); soft: softball.
BALLS = ("hard", "soft")


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


def _too_narrow(basis: int, expansion: Any) -> str:
    """Why ``expansion`` x ``basis`` is no width (it rounds to 0 channels), or ""."""
    k = _parse_expansion(expansion)
    if k == "qlnet" or round(float(k) * basis) >= 1:
        return ""
    return (f"expansion={expansion} gives its QL block no channels ({expansion} x its "
            f"narrowest width {basis} rounds to 0; K > {0.5 / basis:g} gives 1)")


class MultiplicativeVariant(Variant):
    name = "multiplicative"
    summary = "QLNet quadratic-linear blocks (product nonlinearity, no ReLU, hardball)"
    paper = "QLNet (Yao Liu, arXiv 2308.01621)"
    site_kinds = ("block", "network")
    options = (
        Option("layout", "plain", "plain: convert residual blocks in place (same in/out "
               "channels and stride); qlnet: rebuild a torchvision ResNet as QLNet", LAYOUTS),
        Option("hardball", "downsample", "which blocks end with a ball (hardball or softball, "
               "see 'ball'): downsample (stride > 1, the paper's first block of stages 2-4), "
               "skip (every block with a skip conv), all (every block: the author's first "
               "softball code) or none", HARDBALL_PLACEMENTS),
        Option("ball", "hard", "the projection: hard (hardball: x clipped to radius sqrt(C)) "
               "or soft (softball: x / sqrt(1 + |x|^2 / C)); also the one before the head of "
               "layout=qlnet", BALLS),
        Option("dw_kernels", 0, "depthwise conv: 0 = one 3x3 kernel per channel; K = K "
               "kernels shared by all channels (channel c uses kernel c mod K; K divides the "
               "width)", type=int, min=0, max=4096),
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
    leaf_modules = (QLBlock, Hardball, Softball)
    mask_effect = "the residual branch of each QL block: the block computes hardball(skip(x))"
    example_models = ("cifar_resnet20", "resnet18", "resnet50", "resnet34")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = [
            ("cifar_resnet20", {"layout": "plain", "hardball": h}, None)
            for h in HARDBALL_PLACEMENTS]
        cases += [("cifar_resnet20", {"ball": "soft", "hardball": "all"}, None),
                  ("cifar_resnet20", {"dw_kernels": 4}, None)]
        # layout=qlnet needs a torchvision ResNet; resnet18 gives the cheapest QLNet ([2]*4).
        return cases + [("resnet18", {"layout": "qlnet"}, None),
                        ("resnet18", {"layout": "qlnet", "ball": "soft", "dw_kernels": 8}, None)]

    def parse_options(self, raw: Any) -> dict[str, Any]:
        options = super().parse_options(raw)
        _parse_expansion(options["expansion"])  # refuse a bad width rule up front
        return options

    def idle_options(self, sites: Sequence[Site], options: dict[str, Any]) -> dict[str, str]:
        idle = {}
        if options["hardball"] == "none" and options["layout"] != "qlnet":
            idle["ball"] = ("no block ends with a ball with hardball=none, and only "
                            "layout=qlnet puts one before the head")
        if options["dw_kernels"]:
            idle["memory"] = "blocks with dw_kernels run the plain formulation"
        return idle

    def refuse_new(self, sites: Sequence[Site], options: dict[str, Any],
                   analysis: Analysis) -> None:
        """An expansion that gives a block no channels (it would be built at 1 channel,
        the network of another, larger expansion under another key)."""
        for site in sites:
            basis = (min(QLNET_WIDTHS) if options["layout"] == "qlnet"
                     else _block_basis(site, analysis.module(site)))
            narrow = _too_narrow(basis, options["expansion"])
            if narrow:
                raise InfeasiblePlacement(f"multiplicative cannot convert site {site.name}: "
                                          f"{narrow}")

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        return site.kind == ("network" if options["layout"] == "qlnet" else "block")

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["layout"] == "qlnet":
            from torchvision.models.resnet import ResNet

            module = analysis.module(site)
            if not isinstance(module, ResNet):
                return (f"layout=qlnet rebuilds a torchvision ResNet (e.g. resnet50), not a "
                        f"{type(module).__name__}; use --option layout=plain")
            k = options["dw_kernels"]
            widths = sorted({ql_width(w, _parse_expansion(options["expansion"]))
                             for w in QLNET_WIDTHS})
            bad = [w for w in widths if k and w % k]
            return (f"dw_kernels={k} does not divide the QL widths {widths}" if bad else "")
        if len(site.input_shape) != 3 or len(site.output_shape) != 3:
            return (f"it is not a 2-d feature-map block (shapes {site.input_shape} -> "
                    f"{site.output_shape})")
        stride = _block_stride(site)
        h, w = site.input_shape[1:]
        if ((h - 1) // stride + 1, (w - 1) // stride + 1) != tuple(site.output_shape[1:]):
            return (f"it maps {site.input_shape} to {site.output_shape}, which a stride-{stride} "
                    "3x3 conv cannot reproduce")
        k = options["dw_kernels"]
        if k:
            width = ql_width(_block_basis(site, analysis.module(site)),
                             _parse_expansion(options["expansion"]))
            if width % k:
                return f"dw_kernels={k} does not divide its depthwise width {width}"
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
            model = self._qlnet(rewriter.root_module, options)
            rewriter.set_root(site, with_memory(model, options.get("memory", "default")),
                              note="QLNet layout")
            return
        rewriter.replace(site, self.build(site, rewriter.module(site), options, init))

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        stride = _block_stride(site)
        skip = stride != 1 or site.in_channels != site.out_channels
        width = ql_width(_block_basis(site, module), _parse_expansion(options["expansion"]))
        block = QLBlock(site.in_channels, site.out_channels, width, stride,
                        wants_ball(options["hardball"], stride, skip), ball=options["ball"],
                        dw_kernels=options["dw_kernels"])
        with_memory(block, options.get("memory", "default"))
        param = next(module.parameters(), None)
        return block.to(param.device, param.dtype) if param is not None else block

    @staticmethod
    def _qlnet(root: nn.Module, options: dict[str, Any]) -> QLNet:
        layers = [len(getattr(root, f"layer{i}")) for i in range(1, 5)]
        model = QLNet(layers, root.fc.out_features, root.conv1.in_channels,
                      _parse_expansion(options["expansion"]), options["hardball"],
                      ball=options["ball"], dw_kernels=options["dw_kernels"])
        return model.to(root.fc.weight.device, root.fc.weight.dtype)


register_family(MultiplicativeVariant)
