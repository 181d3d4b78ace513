"""parameter-free: spatial convolutions replaced by pooling (Han et al., "Learning Features
with Parameter-Free Layers", ICLR 2022; official code naver-ai/PfLayer, ``resnet_pf.py``).

Site: one spatial Conv2d call (kernel > 1) together with the BN and activation that follow
it (``site.extra['bn']`` / ``['act']``). Layouts (``--option layout=...``):

  max     (R50-max)    conv + BN + act  ->  MaxPool2d(k, stride=s, padding=p); the BN becomes
                       nn.Identity, as in PfLayer's ``MaxBottleneck`` (no BN after the pool),
                       unless the site ends a residual branch (below).
  hybrid  (R50-hybrid) strided sites keep their conv at stride 1 behind an AvgPool2d(s, s)
                       (PfLayer's ``EffBottleneck``: AvgPool2d(2,2) + 3x3 conv+BN+ReLU);
                       every other site becomes a stride-1 max-pool as in ``max``.

``--option pool=avg|identity|shift`` swaps the max-pool for the other parameter-free operations
of PfLayer's layer study: an average (zero padding excluded) or nothing at all (stride-1,
same-size sites only; where the channel count changes, the 1x1 conv remains); or for Wu et
al.'s shift (CVPR 2018, "Shift: A Zero FLOP, Zero Parameter Alternative to Spatial
Convolutions", which PfLayer's paper cites): the channels are split into one group per
kernel tap (the remainder of the division goes to the centre, zero-shift group) and each
group is translated by its tap's offset with zero fill (``Shift2d``). It keeps the conv's
kernel, stride, padding and dilation, so the output has the conv's size (a strided shift is
the stride-1 one with every s-th pixel kept); it has no parameters and no MACs, and needs
an odd kernel (a centre tap). It is placed exactly as the pools: BN dropped after a lone
shift (kept where it ends a residual branch), a 1x1 conv (BN kept) where the channel count
changes.

Attention sites (``vit_pf.py`` / ``pit_pf.py``: ViT-S-max, PiT-S-max): a self-attention on
(tokens, dim) becomes PfLayer's efficient layer, Linear(dim, ratio·dim) -> GELU ->
``pool`` (3x3, stride 1) over the square token grid -> GELU -> Linear(ratio·dim, dim), with
``ratio=3``; a class token in front of the grid skips the pool (see ``TokenPoolLayer``).
By default every other attention is converted -- the blocks at odd positions of each block
list, as PfLayer alternates -- and a network with attentions leaves its convs alone (PiT's
pooling convs stay, as in PiT-S-max).

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
and ReLU is then the identity, so the converted net computes exactly PfLayer's function
(pool=avg and pool=shift, which fill with zeros, keep non-negative maps non-negative too,
so the ReLU is the identity there as well).
(A user who converts a conv that reads signed inputs gets pool -> ReLU there.)

Default sites: every spatial conv except the stem (the conv that reads the image): for
ResNet-50 that is exactly the 16 bottleneck 3x3 convs PfLayer replaces. For basic-block
ResNets and VGGs it is every 3x3 conv after the stem; an identity basic block then has no
weights left in its branch but the BN of its second conv, which stays: a pool that ends a
residual branch keeps its BN (PfLayer has no such site; its pools are followed by a 1x1
conv and BN). Without it the branch pool(ReLU(pool(x))) >= x doubles the activations at
every block; cifar_resnet20 trained that way reached losses of 1e16 and stayed at chance,
with the BN it learns (docs/benchmarks.md). Pass ``--sites`` to keep some convs.

Reference counts at 224x224 (the PfLayer paper): ResNet-50 25.56M / 4.1G MACs; R50-max
14.23M / 2.2G; R50-hybrid 17.33M / 2.6G; autobuild measures 25.56M / 4.09G, 14.23M / 2.24G
and 17.33M / 2.59G, the paper's figures at its one-decimal precision.

A max-pool cannot compute a convolution, so only ``--init scratch`` exists; the convs a
hybrid layout keeps retain their weights.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autobuild.errors import AutobuildError
from autobuild.rewrite import Counts, Option, Region, Site, Variant, register_family
from autobuild.variants._pf_layers import (
    POOLS,
    ParameterFreeLayer,
    TokenPoolLayer,
    auto_prefix,
    grid_side,
    make_pool,
)
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["LAYOUTS", "POOLS", "ParameterFreeLayer", "ParameterFreeVariant", "TokenPoolLayer"]

LAYOUTS = ("max", "hybrid")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    return (math.ceil(span / s) if ceil else span // s) + 1


def layer_problem(site: Site, conv: nn.Module, layout: str, op: str = "max") -> str:
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
    if op == "identity" and max(s) > 1:
        return f"pool=identity cannot down-sample (stride {s}); use pool=max or pool=avg"
    if op == "identity" and any(2 * pi != di * (ki - 1) for pi, ki, di in zip(p, k, d,
                                                                             strict=True)):
        return f"pool=identity keeps the size and the conv (padding {p}) does not"
    if op == "avg" and (max(d) > 1 or any(pi > ki // 2 for pi, ki in zip(p, k, strict=True))):
        return f"pool=avg has no dilation or padding over half its kernel (dilation {d})"
    if op == "shift" and any(ki % 2 == 0 for ki in k):
        return (f"pool=shift needs odd kernel sides (kernel {k}: the shift's centre group has "
                "no tap to stay on); use pool=max or pool=avg")
    return ""


def _hybrid(layout: str, conv: nn.Conv2d) -> bool:
    """Whether the site keeps its conv behind an AvgPool2d (hybrid layout, strided site)."""
    return layout == "hybrid" and max(_pair(conv.stride)) > 1


def drops_bn(site: Site, conv: nn.Conv2d, layout: str) -> bool:
    """A lone pool replaces conv + BN (PfLayer's MaxBottleneck has no BN after the pool),
    except at the end of a residual branch: there the BN is all that normalises the branch
    before the addition (PfLayer's pool is followed by a 1x1 conv and its BN)."""
    return (not _hybrid(layout, conv) and conv.in_channels == conv.out_channels
            and not site.extra.get("into_add"))


def build_layer(site: Site, conv: nn.Conv2d, layout: str,
                op: str = "max") -> tuple[ParameterFreeLayer, bool]:
    """The replacement of ``conv`` and whether the BN after it must go (pool only)."""
    problem = layer_problem(site, conv, layout, op)
    if problem:
        raise AutobuildError(f"parameter-free cannot convert site {site.name}: {problem}")
    k, s = _pair(conv.kernel_size), _pair(conv.stride)
    p, d = _pair(conv.padding), _pair(conv.dilation)
    if _hybrid(layout, conv):
        # PfLayer's EffBottleneck: down-sample first, then the same conv at stride 1.
        kept = copy.deepcopy(conv)
        kept.stride = (1, 1)
        kept.requires_grad_(True)  # a new layer trains, whether or not the baseline's did
        return ParameterFreeLayer(nn.AvgPool2d(s, s, ceil_mode=True), kept), False
    # MaxPool2d pads with -inf itself up to half its kernel; dilated convs (SSD's fc6:
    # 3x3, dilation 6, padding 6) need the padding done explicitly. The shift pads itself,
    # with zeros, whatever the padding.
    # (An identity has no padding to do: the conv it replaces is 'same'-padded.)
    inline = op in ("shift", "identity") or all(pi <= ki // 2 for pi, ki in zip(p, k,
                                                                                strict=True))
    pool = make_pool(op, k, s, p if inline else 0, d, channels=conv.in_channels)
    pad = (0, 0) if inline else p
    if conv.in_channels == conv.out_channels:
        return ParameterFreeLayer(pool, pad=pad), drops_bn(site, conv, layout)
    # A pool keeps the channel count: a 1x1 conv maps it, and the BN after it stays.
    mix = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    mix.to(conv.weight.device, conv.weight.dtype)
    return ParameterFreeLayer(pool, mix, pad), False


# ---- attention sites (PfLayer's ViT-S-max / PiT-S-max) -------------------------------------
def _prefix(site: Site, options: dict[str, Any]) -> int:
    n = site.input_shape[0] if len(site.input_shape) == 2 else 0
    return auto_prefix(n) if options["prefix_tokens"] < 0 else options["prefix_tokens"]


def attention_problem(site: Site, options: dict[str, Any]) -> str:
    if len(site.input_shape) != 2 or len(site.output_shape) != 2:
        return (f"its input {site.input_shape} is not a (tokens, dim) sequence (an attention "
                "over a spatial grid of tokens is converted)")
    n, prefix = site.input_shape[0], _prefix(site, options)
    if options["pool"] != "identity" and grid_side(n, prefix) is None:
        return (f"its {n} tokens minus {prefix} prefix tokens do not form a square grid "
                "(set --option prefix_tokens=N)")
    if options["kernel"] % 2 == 0:
        return f"kernel={options['kernel']} must be odd (the grid keeps its size)"
    return ""


def build_token_layer(site: Site, module: nn.Module, options: dict[str, Any]) -> TokenPoolLayer:
    problem = attention_problem(site, options)
    if problem:
        raise AutobuildError(f"parameter-free cannot convert site {site.name}: {problem}")
    drop = getattr(module, "proj_drop", None)
    layer = TokenPoolLayer(site.in_channels, options["ratio"] * site.in_channels,
                           site.out_channels, pool=options["pool"], kernel=options["kernel"],
                           prefix=_prefix(site, options),
                           drop=drop.p if isinstance(drop, nn.Dropout) else 0.0)
    param = next(module.parameters(), None)
    return layer.to(param.device, param.dtype) if param is not None else layer


def _odd_position(path: str) -> bool:
    """Whether the innermost numbered module on ``path`` has an odd index (blocks.3.attn:
    yes); a path without numbers counts as odd (it is converted)."""
    numbers = [int(p) for p in path.split(".") if p.isdigit()]
    return not numbers or numbers[-1] % 2 == 1


class ParameterFreeVariant(Variant):
    name = "parameter-free"
    summary = ("spatial convs replaced by pooling (PfLayer R50-max / R50-hybrid); attentions by "
               "Linear-GELU-pool-GELU-Linear (ViT-S-max / PiT-S-max)")
    paper = ("Han et al., Learning Features with Parameter-Free Layers, ICLR 2022 "
             "(naver-ai/PfLayer)")
    site_kinds = ("conv", "attention")
    options = (
        Option("layout", "max", "conv sites. max: every site a pool (R50-max); hybrid: strided "
               "sites keep AvgPool2d + stride-1 conv, the rest a pool (R50-hybrid)", LAYOUTS),
        Option("pool", "max", "the parameter-free operation: max (PfLayer's models), avg "
               "(average, zero padding excluded), identity (no spatial operation: stride-1, "
               "same-size sites only; on attentions a token-wise MLP) or shift (Wu et al. "
               "2018: one channel group per kernel tap, each translated by its offset with "
               "zero fill; odd kernels)", POOLS),
        Option("ratio", 3, "attention sites: hidden width = ratio x dim (PfLayer: 3, the "
               "width of the qkv projection it replaces)", type=int, min=1, max=16),
        Option("kernel", 3, "attention sites: pool window on the token grid (odd)", type=int,
               min=1, max=15),
        Option("prefix_tokens", -1, "attention sites: tokens before the grid that skip the "
               "pool (class/register tokens); -1: those beyond the largest square", type=int,
               min=-1, max=64),
    )
    inits = ("scratch",)
    primary_option = "layout"
    leaf_modules = (ParameterFreeLayer, TokenPoolLayer)
    mask_effect = ("the layer's output (zeros): the site contributes nothing, e.g. a residual "
                   "block computes its shortcut plus the rest of its branch on zeros")
    example_models = ("cifar_resnet20", "resnet50", "resnet18", "cifar_vgg16", "ssd300_vgg16")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases = super().contract_cases()
        if importlib.util.find_spec("timm") is not None:  # the tiny ViT needs timm
            cases += [("vit_micro_cifar", {"pool": op}, None) for op in POOLS]
        return cases

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        if site.kind == "attention":
            return True
        return site.kind == "conv" and max(site.kernel_size, default=1) > 1

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if site.kind == "attention":
            return attention_problem(site, options)
        return layer_problem(site, analysis.module(site), options["layout"], options["pool"])

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """Networks with attentions: every other one, as PfLayer's ViT-S-max and PiT-S-max
        (the blocks at odd positions of each block list; the others keep attention); else
        every spatial conv except the stem (ResNet-50: the 16 bottleneck 3x3 convs)."""
        attention = [s for s in candidates if s.kind == "attention"]
        if attention:
            return [s for s in attention if _odd_position(s.target)]
        return [s for s in candidates if not s.extra.get("stem")]

    def idle_options(self, sites: Sequence[Site], options: dict[str, Any]) -> dict[str, str]:
        kinds = {s.kind for s in sites}
        return {**({name: "it shapes attention sites, and none is converted"
                    for name in ("ratio", "kernel", "prefix_tokens")}
                   if "attention" not in kinds else {}),
                **({"layout": "it shapes conv sites, and none is converted"}
                   if "conv" not in kinds else {})}

    def region(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Region:
        region = analysis.region(site.name)
        bn = site.extra.get("bn")
        if (site.kind == "conv" and bn
                and drops_bn(site, analysis.module(site), options["layout"])):
            region = region | Region(analysis.call_nodes(bn), frozenset({bn}))
        return region

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        with torch.device("meta"):
            if site.kind == "attention":
                layer: nn.Module = build_token_layer(site, analysis.meta_module(site), options)
            else:
                layer, _ = build_layer(site, analysis.meta_module(site), options["layout"],
                                       options["pool"])
        return count_replacement(layer, site.input_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        if site.kind == "attention":
            layer = build_token_layer(site, rewriter.module(site), options)
            rewriter.replace(site, layer, note=f"pool={options['pool']}")
            return
        layer, drop_bn = build_layer(site, rewriter.module(site), options["layout"],
                                     options["pool"])
        rewriter.replace(site, layer, note=f"layout={options['layout']}")
        bn = site.extra.get("bn")
        if drop_bn and bn:
            rewriter.replace_module(bn, nn.Identity(), site=site.name,
                                    note=f"no BN after the pool of {site.name} (PfLayer)")


register_family(ParameterFreeVariant)
