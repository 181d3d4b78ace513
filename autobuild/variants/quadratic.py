"""quadratic: second-order neurons (QuadraLib, Xu et al., MLSys 2022, and the papers it surveys).

Site: one Conv2d or Linear call. Types (``--option type=...``), for a conv W·x:

  ours      BN_a(W_a x) ⊙ BN_b(W_b x) + BN_c(W_c x)          3x params
  t2        W_a (x ⊙ x)                                       1x
  t3        (W_a x)²                                          1x
  t4        (W_a x) ⊙ (W_b x)                                 2x
  fan       (W_a x + b_a) ⊙ (W_b x + b_b) + W_c (x ⊙ x) + c   3x   (Fan et al. 2018)
  volterra  pᵀ A_o p + W_b p per output o, p = receptive field ≈ C·k² x (Zoumpourlis 2017)

Branches that read the same input are one conv with 2x/3x output channels, split
afterwards (``fan`` has a second conv only because its third branch reads x ⊙ x).
``init=preserve`` copies the baseline conv into the linear branch and starts the
second-order term at exactly zero; t2/t3/t4 have no linear branch and refuse it.
Unlike QuadraLib's code, volterra takes patches with ``unfold`` (patch-major, never a
``.view`` across channels) and honours stride, padding and dilation.

Which sites (``--option stem=keep|convert``, ``--option shortcuts=convert|linear``): by
default every conv but the stem, projection shortcuts included; ``stem=convert`` adds the
stem (QuadraLib's VGGs and MobileNet convert it), ``shortcuts=linear`` keeps the 1x1
projection shortcuts of residual blocks first-order (QuadraLib's ResNets do), refusing them
when named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from autobuild.errors import InfeasiblePlacement
from autobuild.rewrite import Option, Site, Variant, register_family
from autobuild.variants._quadratic_layers import (
    MEMORY_MODES,
    PRESERVING_TYPES,
    QUADRATIC_TYPES,
    VOLTERRA_MAX_PARAMS,
    QuadraticConv2d,
    QuadraticLinear,
)
from autobuild.variants._quadratic_sites import (
    SHORTCUT_CHOICES,
    STEM_CHOICES,
    projection_shortcuts,
)

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis

__all__ = ["QUADRATIC_TYPES", "QuadraticConv2d", "QuadraticLinear", "QuadraticVariant"]

def quadratic_params(site: Site, qtype: str) -> int:
    """Parameters the converted layer would have (to refuse oversized volterra layers)."""
    fan_in = (site.in_channels // site.groups) * math.prod(site.kernel_size or (1,))
    n = QUADRATIC_TYPES[qtype]
    total = n * site.out_channels * fan_in + site.out_channels * n
    if qtype == "volterra":
        total += site.out_channels * fan_in * fan_in
    if qtype == "fan":
        total += site.out_channels * fan_in + site.out_channels  # W_c and c
    if qtype == "ours":
        total += 6 * site.out_channels
    return total


class QuadraticVariant(Variant):
    name = "quadratic"
    summary = "second-order neurons replacing Conv2d/Linear layers (6 types)"
    paper = "QuadraLib (Xu et al., MLSys 2022); Fan et al. 2018; Zoumpourlis et al. 2017"
    site_kinds = ("conv", "linear")
    # fan's output bias c came while plans were at version 2: such a plan's weights may lack
    # it, and c = 0 is the neuron they had (a file that has it keeps its own).
    legacy_parameters = {2: {"bias_sq": 0.0}}
    options = (
        Option("type", "ours", "neuron type", tuple(QUADRATIC_TYPES)),
        Option("volterra_max_params", VOLTERRA_MAX_PARAMS,
               "largest volterra layer (parameters) that is built", None, int, min=1),
        Option("stem", "keep", "keep: the stem (the conv that reads the image) stays "
               "first-order by default (QuadraLib's ResNets); convert: it is a default site "
               "too (QuadraLib's VGGs and MobileNet)", STEM_CHOICES),
        Option("shortcuts", "convert", "convert: 1x1 projection shortcuts are sites like any "
               "conv; linear: they stay first-order and are refused when named (QuadraLib's "
               "ResNets)", SHORTCUT_CHOICES),
        Option("memory", "default", "type ours, training: 'default' keeps the conv output for "
               "backward; 'save' keeps only input, weights and BN statistics and recomputes "
               "the conv in backward (about a quarter of the memory, one more conv)",
               MEMORY_MODES),
    )
    primary_option = "type"
    leaf_modules = (QuadraticConv2d, QuadraticLinear)
    example_models = ("cifar_resnet20", "resnet50", "cifar_vgg16", "ssd300_vgg16")
    mask_effect = ("the second-order term: ours/fan keep their linear branch (BN_c(W_c x), "
                   "W_c(x⊙x)), volterra its linear part; t2/t3/t4 output zero")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases = super().contract_cases()
        cases += [("cifar_resnet20", {"type": "ours"}, ["fc"])]  # a Linear site
        return cases

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """Every conv except the stem (the conv that reads the image), as QuadraLib does;
        for volterra, only those whose layer stays under ``volterra_max_params`` (naming a
        larger site explicitly is refused with its size)."""
        sites = [s for s in candidates if s.kind == "conv"
                 and (options["stem"] == "convert" or not s.extra.get("stem"))]
        if options["type"] == "volterra":
            sites = [s for s in sites if quadratic_params(s, "volterra")
                     <= options["volterra_max_params"]]
            if not sites:
                raise InfeasiblePlacement(
                    "no default site is small enough for volterra (limit "
                    f"{options['volterra_max_params']:,} parameters); name sites with --sites "
                    "or raise --option volterra_max_params")
        return sites

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["shortcuts"] == "linear" and site.target in projection_shortcuts(analysis):
            return ("it is a projection shortcut and shortcuts=linear keeps those first-order "
                    "(QuadraLib's ResNets); drop it or use --option shortcuts=convert")
        module = analysis.module(site)
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"it pads with padding_mode={module.padding_mode!r} (only zeros is supported)"
        if options["type"] != "volterra":
            return ""
        if site.groups != 1:
            return f"volterra converts dense convs only and it has groups={site.groups}"
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            return f"volterra needs numeric padding, not padding={module.padding!r}"
        size, limit = quadratic_params(site, "volterra"), options["volterra_max_params"]
        if size > limit:
            return (f"volterra would have {size:,} parameters (A_o is (C·k²)² = "
                    f"{size // max(site.out_channels, 1):,} per output channel), over the "
                    f"limit of {limit:,}; choose smaller sites or raise --option "
                    "volterra_max_params")
        return ""

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str,
              analysis: Analysis) -> None:
        super().check(sites, options, init, analysis)
        qtype = options["type"]
        if init == "preserve" and qtype not in PRESERVING_TYPES:
            raise InfeasiblePlacement(
                f"quadratic type {qtype} has no first-order term and cannot preserve the "
                f"baseline (--init preserve); use --init scratch or type "
                f"{'/'.join(PRESERVING_TYPES)}")

    def idle_options(self, sites: Sequence[Site], options: dict[str, Any]) -> dict[str, str]:
        qtype = options["type"]
        return {**({"volterra_max_params": "it sizes type volterra"}
                   if qtype != "volterra" else {}),
                **({"memory": "it chooses what type ours keeps for backward"}
                   if qtype != "ours" else {})}

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        qtype = options["type"]
        if isinstance(module, nn.Conv2d):
            layer: QuadraticConv2d | QuadraticLinear = QuadraticConv2d.from_conv(module, qtype)
        else:
            layer = QuadraticLinear.from_linear(module, qtype)
        if init == "preserve":
            layer.preserve(module.weight.detach(),
                           module.bias.detach() if module.bias is not None else None)
        layer.memory = options.get("memory", "default")
        return layer


register_family(QuadraticVariant)
