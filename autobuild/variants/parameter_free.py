"""parameter-free: spatial convolutions replaced by pooling (Han et al., "Learning Features
with Parameter-Free Layers", ICLR 2022; official code naver-ai/PfLayer, ``resnet_pf.py``).

Site: one spatial Conv2d call (kernel > 1) together with the BN and activation that follow
it (``site.extra['bn']`` / ``['act']``). Layouts (``--option layout=...``):

  max     (R50-max)    conv + BN + act  ->  MaxPool2d(k, stride=s, padding=p); the BN becomes
                       nn.Identity, as in PfLayer's ``MaxBottleneck`` (no BN after the pool).
  hybrid  (R50-hybrid) strided sites keep their conv at stride 1 behind an AvgPool2d(s, s)
                       (PfLayer's ``EffBottleneck``: AvgPool2d(2,2) + 3x3 conv+BN+ReLU);
                       every other site becomes a stride-1 max-pool as in ``max``.

The pool takes the conv's own kernel, stride, padding and dilation, so the output keeps its
size; for the 3x3/padding-1 convs of ResNets and VGGs that is exactly PfLayer's
MaxPool2d(3, s, 1). A dilated conv whose padding MaxPool2d refuses (SSD's fc6) is padded
with -inf explicitly, which is what MaxPool2d's padding means. The hybrid AvgPool2d uses
``ceil_mode=True``: identical to PfLayer's on even sizes, and it keeps the conv's output
size on odd ones (SSD's 19x19 maps).

Where the conv changes the channel count (VGG, the first conv of a basic block), a pool
cannot; it is then followed by a 1x1 conv that maps the channels, and the BN is kept.

The activation module is never removed. torchvision's Bottleneck calls ONE ReLU three
times, so the ReLU after conv2 cannot be dropped without editing the graph; it is also
harmless: every spatial conv of the baselines we ship reads a ReLU output (or a max-pool
of one), the max-pool of non-negative values is non-negative (MaxPool2d pads with -inf),
and ReLU is then the identity, so the converted net computes exactly PfLayer's function.
(A user who converts a conv that reads signed inputs gets pool -> ReLU there.)

Default sites: every spatial conv except the stem (the conv that reads the image): for
ResNet-50 that is exactly the 16 bottleneck 3x3 convs PfLayer replaces. For basic-block
ResNets and VGGs it is every 3x3 conv after the stem; an identity basic block then has no
weights left in its branch (pass ``--sites`` to keep some convs). Reference counts at
224x224 (the PfLayer paper): ResNet-50 25.56M / 4.1G MACs; R50-max 14.23M / 2.2G;
R50-hybrid 17.33M / 2.6G; autobuild measures 25.56M / 4.09G, 14.23M / 2.24G and
17.33M / 2.59G, the paper's figures at its one-decimal precision.

A max-pool cannot compute a convolution, so only ``--init scratch`` exists; the convs a
hybrid layout keeps retain their weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.ops.pool import max_pool2d
from autobuild.rewrite import Counts, Option, Region, Site, Variant, register_family
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["LAYOUTS", "ParameterFreeLayer", "ParameterFreeVariant"]

LAYOUTS = ("max", "hybrid")


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
        pool = self.pool
        if type(pool) is nn.MaxPool2d and not pool.return_indices:
            # Same outputs and gradients as the module; keeps 2 bytes per output for
            # backward instead of the input and int64 indices (autobuild.ops.pool).
            x = max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                           pool.ceil_mode)
        else:
            x = pool(x)
        return x if self.conv is None else self.conv(x)

    def extra_repr(self) -> str:
        return f"pad={self.pad}" if self.pad != (0, 0) else ""


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    return (math.ceil(span / s) if ceil else span // s) + 1


def layer_problem(site: Site, conv: nn.Module, layout: str) -> str:
    """Why ``conv`` at ``site`` cannot become a parameter-free layer ("" when it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"it is a {type(conv).__name__}, not a Conv2d"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return (f"it has padding={conv.padding!r}, padding_mode={conv.padding_mode!r} (only "
                "zero-padded convs with numeric padding are converted)")
    k, s = _pair(conv.kernel_size), _pair(conv.stride)
    p, d = _pair(conv.padding), _pair(conv.dilation)
    if _hybrid(layout, conv):
        if len(site.input_shape) == 3 and len(site.output_shape) == 3:
            got = tuple(_out_size(_out_size(n, si, si, 0, 1, ceil=True), ki, 1, pi, di)
                        for n, ki, si, pi, di in zip(site.input_shape[1:], k, s, p, d,
                                                     strict=True))
            if got != tuple(site.output_shape[1:]):
                return (f"layout=hybrid would change its output size "
                        f"({tuple(site.output_shape[1:])} -> {got}: the conv is not "
                        "'same'-padded); use layout=max")
        return ""
    if any(2 * pi > di * (ki - 1) for pi, ki, di in zip(p, k, d, strict=True)):
        return f"its padding {p} exceeds half its kernel {k} at dilation {d}"
    return ""


def _hybrid(layout: str, conv: nn.Conv2d) -> bool:
    """Whether the site keeps its conv behind an AvgPool2d (hybrid layout, strided site)."""
    return layout == "hybrid" and max(_pair(conv.stride)) > 1


def drops_bn(conv: nn.Conv2d, layout: str) -> bool:
    """A lone max-pool replaces conv + BN (PfLayer's MaxBottleneck has no BN after the pool)."""
    return not _hybrid(layout, conv) and conv.in_channels == conv.out_channels


def build_layer(site: Site, conv: nn.Conv2d, layout: str) -> tuple[ParameterFreeLayer, bool]:
    """The replacement of ``conv`` and whether the BN after it must go (pool only)."""
    problem = layer_problem(site, conv, layout)
    if problem:
        raise AutobuildError(f"parameter-free cannot convert site {site.name}: {problem}")
    k, s = _pair(conv.kernel_size), _pair(conv.stride)
    p, d = _pair(conv.padding), _pair(conv.dilation)
    if _hybrid(layout, conv):
        # PfLayer's EffBottleneck: down-sample first, then the same conv at stride 1.
        kept = copy.deepcopy(conv)
        kept.stride = (1, 1)
        return ParameterFreeLayer(nn.AvgPool2d(s, s, ceil_mode=True), kept), False
    # MaxPool2d pads with -inf itself up to half its kernel; dilated convs (SSD's fc6:
    # 3x3, dilation 6, padding 6) need the padding done explicitly.
    inline = all(pi <= ki // 2 for pi, ki in zip(p, k, strict=True))
    pool = nn.MaxPool2d(k, s, p if inline else 0, d)
    pad = (0, 0) if inline else p
    if conv.in_channels == conv.out_channels:
        return ParameterFreeLayer(pool, pad=pad), True
    # A pool keeps the channel count: a 1x1 conv maps it, and the BN after it stays.
    mix = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    mix.to(conv.weight.device, conv.weight.dtype)
    return ParameterFreeLayer(pool, mix, pad), False


class ParameterFreeVariant(Variant):
    name = "parameter-free"
    summary = "spatial convs replaced by max-pooling (PfLayer R50-max / R50-hybrid)"
    paper = ("Han et al., Learning Features with Parameter-Free Layers, ICLR 2022 "
             "(naver-ai/PfLayer)")
    site_kinds = ("conv",)
    options = (
        Option("layout", "max", "max: every site a max-pool (R50-max); hybrid: strided sites "
               "keep AvgPool2d + stride-1 conv, the rest max-pool (R50-hybrid)", LAYOUTS),
    )
    inits = ("scratch",)
    primary_option = "layout"
    leaf_modules = (ParameterFreeLayer,)
    mask_effect = ("the pooling layer's output (zeros): the site contributes nothing, e.g. a "
                   "residual block computes its shortcut plus the rest of its branch on zeros")
    example_models = ("cifar_resnet20", "resnet50", "resnet18", "cifar_vgg16", "ssd300_vgg16")

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        return site.kind == "conv" and max(site.kernel_size, default=1) > 1

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        return layer_problem(site, analysis.module(site), options["layout"])

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """Every spatial conv except the stem (for ResNet-50: the 16 bottleneck 3x3 convs)."""
        return [s for s in candidates if not s.extra.get("stem")]

    def region(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Region:
        region = analysis.region(site.name)
        bn = site.extra.get("bn")
        if bn and drops_bn(analysis.module(site), options["layout"]):
            region = region | Region(analysis.call_nodes(bn), frozenset({bn}))
        return region

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        with torch.device("meta"):
            layer, _ = build_layer(site, analysis.meta_module(site), options["layout"])
        return count_replacement(layer, site.input_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        layer, drop_bn = build_layer(site, rewriter.module(site), options["layout"])
        rewriter.replace(site, layer, note=f"layout={options['layout']}")
        bn = site.extra.get("bn")
        if drop_bn and bn:
            rewriter.replace_module(bn, nn.Identity(), site=site.name,
                                    note=f"no BN after the max-pool of {site.name} (PfLayer)")


register_family(ParameterFreeVariant)
