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
                        conv + BN + ReLU of h (the official default, ``--non_linear``),
                        or what ``velocity=`` / ``diffusivity=`` choose (below);
  constant              Dx = Dy = 1 (the official cDx = cDy = 1) and u = v = 0: diffusion
                        with a source, the layer's only weights are its output BN;
  constant_diffusivity  the official ``--constant_Dxy``: learned velocity, Dx = Dy = 1.

The ablations of the paper and the official flags (each also on layout=paper):

  velocity=     the map in ReLU(BN(map(h))) for u and v, the official ``--custom_uv``:
                dwconv (default) | identity | basicblock | bottleneck | dwconv_bias (the
                official 'DwConv', with bias) | pwconv | fullconv | basicdense (the official
                'BasicDense'); ``none``: v = 0 (diffusion only).
  diffusivity=  the same maps for Dx, Dy (``--custom_dxy``), or ``isotropic`` (the official
                ``use_dot``: one nonlinear field D = ReLU(BN_x(conv_x h)·ReLU(BN_y(conv_y h)))
                for both axes), ``constant`` (D = 1), ``none`` (D = 0: advection only).
  init_block=   the official ``cell_type``: H^0 = block(f) (identity by default; basicblock,
                bottleneck, ... give the residual-block initialisation; the coefficients
                are computed from H^0 and H^-1 stays f).
  dx=, dy=      the grid spacing (the official ``--dx``/``--dy``: shifts and scales).
  residual=     true adds f to the output (the official ``--use_res``).
  source=       false drops the 2·dt·f term of the scheme (the official ``--no_f``).
  act=          ``silu``: SiLU instead of ReLU for the fields and the output (``--use_silu``).
  h_prev=       ``init_block``: H^-1 = init_block(f) instead of f (``--init_h0_h``).
  velocity_from= ``f``: the velocity maps read f instead of H^0 (``use_f_for_g``).
  velocity=isotropic with diffusivity=isotropic is the official ``use_dot``.
  cdx=, cdy=    the constants of diffusivity=constant (``--cDx``/``--cDy``, default 1).
  separable=    depthwise-separable 3x3 convs in the basic blocks (``--separable``).
  widths=       layout=paper: 3 or 4 stage widths (``--n1``..``--n4``; three = ``-o`` and
                WideResnet-Global, whose widths are n_i × ``-wdt``, with init_block=basicblock).
  (``--old_style`` is velocity=dwconv_bias diffusivity=dwconv_bias.)
  bn_eps=       ``channels`` (default): the official code builds the coefficient batch norms
                as ``norm_layer(planes, planes)``, i.e. eps = the channel count (16/32/64),
                which damps the coefficients; autobuild reproduces it so that weights
                trained with the official code give its outputs (with eps 1e-5 they differ by
                10-14%). ``1e-5`` restores PyTorch's default.

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
         On a DenseNet-BC (``cifar_densenet_bc*``): the official DenseNet-Global, the
         baseline's class with ``dense_layers`` layers per dense block and a Global layer
         after each transition (465,442 params on cifar_densenet_bc100 with
         init_block=basicdense, as the official code).
         On DARTS-V2 (``cifar_darts_v2``): the official DARTS-Global, ``cells`` cells and,
         before each reduction cell, a Global layer whose H^0 is one more normal cell
         (``CellGlobalLayer``; 791,938 params, as the official code).
         On timm's ``mobilenetv2_100``, ``efficientnet_b0`` and ``mobilenetv3_large_100``
         (``timm:<name>``): the official ImageNet MobileNetV2-, EfficientNet-B0- and
         MobileNetV3-Large-Global (``imagenet_global_models.py``): fewer inverted residuals
         per stage, most stages ending in a Global block whose H^0 is an inverted residual
         (``InvertedResidualGlobal``); each block's K, dt, dx, dy, velocity and constant
         diffusivity are the official arch strings' (``autobuild.variants._pde_mobile``),
         so the layer options stay at their defaults there. 2,952,232 / 3,822,932 /
         3,868,160 params at 1000 classes, as the official code (timm's baselines: 3.50M /
         5.29M / 5.48M).

Deliberate difference from the official code: the
division by 1 + 2Bx + 2By is a division, not a product with its reciprocal, so that
autobuild.count sees every stencil FLOP (aten.roll moves data and costs 0).
Only ``--init scratch`` exists: a Global layer cannot reproduce the blocks it replaces.
"""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.rewrite import Counts, Option, Region, Site, Variant, register_family
from autobuild.variants._pde_layers import (
    ACTS,
    BN_EPS,
    COEFFS,
    DIFFUSIVITIES,
    H_PREV,
    INIT_BLOCKS,
    PAPER_WIDTHS,
    VELOCITIES,
    VELOCITY_FROM,
    Coefficient,
    DepthwiseCoefficient,
    GlobalLayer,
    canonical_widths,
    pde_steps,
    resolve_coeffs,
)
from autobuild.variants._pde_mobile import (
    MOBILE_BASELINES,
    MOBILE_NAMES,
    InvertedResidualGlobal,
    mobile_refusal,
)
from autobuild.variants._pde_networks import (
    DARTS,
    DENSENET,
    MOBILE,
    CellGlobalLayer,
    ResNetGlobal,
    paper_network,
)
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["ACTS", "BN_EPS", "COEFFS", "DIFFUSIVITIES", "H_PREV", "INIT_BLOCKS", "LAYOUTS",
           "PAPER_WIDTHS", "VELOCITIES", "VELOCITY_FROM", "Coefficient", "DepthwiseCoefficient",
           "GlobalLayer", "PdeGlobalVariant", "ResNetGlobal", "pde_steps"]

LAYOUTS = ("plain", "paper")
#: GlobalLayer keyword arguments taken from the options as they are.
_LAYER_OPTIONS = ("coeffs", "dx", "dy", "velocity", "diffusivity", "init_block", "bn_eps",
                  "residual", "source", "act", "h_prev", "velocity_from", "cdx", "cdy",
                  "separable")
_DEFAULT_WIDTHS = "/".join(map(str, PAPER_WIDTHS))
#: The options that shape each layout=paper network, by baseline class.
_PAPER_OPTIONS: dict[str, tuple[str, ...]] = {
    "CifarResNet": ("blocks", "widths"), DENSENET: ("dense_layers",), DARTS: ("cells",),
    **{m: () for m in MOBILE}}
_BASELINE_NAMES = {"CifarResNet": "a CIFAR ResNet", DENSENET: "a DenseNet-BC",
                   DARTS: "a DARTS"}
_PAPER_NAMES = {"CifarResNet": "ResNet-Global", DENSENET: "DenseNet-Global",
                DARTS: "DARTS-Global"}
#: What layout=paper reads off a DenseNet or DARTS baseline to rebuild it.
_REBUILT_FROM = {DENSENET: ("growth", "block_config", "compression", "classifier", "features"),
                 DARTS: ("c", "genotype", "classifier", "stem", "auxiliary_head")}


def _without_effect(options: dict[str, Any], baselines: set[str],
                    velocity: str) -> tuple[str, str] | None:
    """An option set away from its default that changes nothing with the others, and why
    (None if none): a placement must name one network once, not twice under two keys.
    ``velocity`` is the velocity map that ``coeffs`` resolves to."""
    # H^0 differs from f only through an init block (a DARTS cell in DARTS-Global).
    has_init = options["init_block"] != "identity" or (
        options["layout"] == "paper" and DARTS in baselines)
    if options["h_prev"] != "f" and not has_init:
        return "h_prev", "H^0 is f without an init_block"
    if options["velocity_from"] != "h" and (not has_init or velocity == "none"):
        return "velocity_from", "H^0 is f without an init_block, or there is no velocity"
    maps = (options["velocity"], options["diffusivity"], options["init_block"])
    paper_resnet = options["layout"] == "paper" and "CifarResNet" in baselines
    if options["separable"] and "basicblock" not in maps and not paper_resnet:
        return "separable", "no basic block: it applies to layout=paper's ResNet stages and " \
                            "basicblock maps"
    return None


def _layer_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    return {"steps": options["K"], "dt": options["dt"],
            **{k: options[k] for k in _LAYER_OPTIONS}}


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
               "paper: the official CIFAR ResNet-, DenseNet- or DARTS-Global (cifar_resnet*, "
               "cifar_densenet_bc*, cifar_darts_v2[_aux]) or ImageNet MobileNetV2-, "
               "EfficientNet-B0- or MobileNetV3-Global (timm:mobilenetv2_100, "
               "timm:efficientnet_b0, timm:mobilenetv3_large_100)", LAYOUTS),
        Option("coeffs", "dwconv", "velocity/diffusivity: depthwise conv+BN+ReLU of h, "
               "constant (D=1, v=0), or constant_diffusivity (official --constant_Dxy)", COEFFS),
        Option("K", 1, "PDE steps per Global layer", None, int, min=1, max=100),
        Option("dt", 0.2, "PDE time step", None, float, min=0.0, min_inclusive=False),
        Option("blocks", 1, "basic blocks per stage of layout=paper (official -m: 1 = "
               "ResNet-32-Global, 2 = ResNet-56-Global)", None, int, min=1, max=64),
        Option("velocity", "dwconv", "the map of ReLU(BN(map(h))) for the velocity (official "
               "--custom_uv); none: no advection (diffusion only)", VELOCITIES),
        Option("diffusivity", "dwconv", "the map for the diffusivity (official --custom_dxy), "
               "isotropic (one nonlinear field for both axes), constant (D=1) or none (D=0: "
               "advection only)", DIFFUSIVITIES),
        Option("init_block", "identity", "H^0 = block(f) (official cell_type; basicblock: the "
               "residual-block initialisation)", INIT_BLOCKS),
        # A spacing is also the shift of torch.roll: past a feature map's size it wraps.
        Option("dx", 1, "grid spacing along H (official --dx)", None, int, min=1, max=64),
        Option("dy", 1, "grid spacing along W (official --dy)", None, int, min=1, max=64),
        Option("bn_eps", "channels", "eps of the coefficient batch norms: channels (the "
               "official code's norm_layer(planes, planes)) or 1e-5 (PyTorch's default)",
               BN_EPS, aliases=(("1e-05", "1e-5"), ("0.00001", "1e-5"))),
        Option("residual", False, "add the layer input to its output (official --use_res)",
               type=bool),
        Option("source", True, "keep the source term 2·dt·f (false: the official --no_f)",
               type=bool),
        Option("act", "relu", "activation of the coefficient fields and the output (silu: "
               "the official --use_silu)", ACTS),
        Option("h_prev", "f", "H^-1 of the scheme: f, or init_block(f) (the official "
               "--init_h0_h)", H_PREV),
        Option("velocity_from", "h", "compute the velocity from H^0 = init_block(f) (h) or "
               "from f (the official --use_f_for_g)", VELOCITY_FROM),
        Option("cdx", 1.0, "the constant diffusivity along H when diffusivity=constant (the "
               "official --cDx)", None, float, min=0.0, max=1e6),
        Option("cdy", 1.0, "the constant diffusivity along W when diffusivity=constant (the "
               "official --cDy)", None, float, min=0.0, max=1e6),
        Option("separable", False, "depthwise-separable 3x3 convs in the basic blocks (stage "
               "blocks of layout=paper, basicblock maps; the official --separable)", type=bool),
        Option("dense_layers", 8, "layout=paper on a DenseNet-BC: layers per dense block of "
               "the DenseNet-Global (the official --n1..--n3 there; its runner's 8)", None, int,
               min=1, max=200),
        Option("cells", 6, "layout=paper on DARTS: cells of the DARTS-Global (the official "
               "-m there; its runner's 6; at least 5, so that a normal cell precedes each "
               "reduction)", None, int, min=5, max=60),
        Option("widths", _DEFAULT_WIDTHS, "layout=paper: channels of the 3 or 4 stages, '/' "
               "between them (the official --n1..--n4; 3 numbers: the three-stage network, "
               "e.g. 64/128/256 for WRN-40-4-Global)", normalize=canonical_widths),
    )
    inits = ("scratch",)
    primary_option = "layout"
    # Plans saved before bn_eps existed (version 2) built PyTorch's eps.
    legacy_defaults = {2: {"bn_eps": "1e-5"}}
    leaf_modules = (GlobalLayer, CellGlobalLayer, InvertedResidualGlobal)
    mask_effect = ("the Global layer (it becomes the identity: the stage is its first block; "
                   "in DARTS-Global the Global layer and the cell that starts it; in the "
                   "ImageNet Global networks each Global block becomes its inverted residual)")
    example_models = ("cifar_resnet20", "cifar_resnet32", "resnet18", "resnet50")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = [
            (self.example_models[0], {"coeffs": c}, None) for c in COEFFS]
        cases.append(("cifar_resnet32", {"layout": "paper"}, None))
        cases.append((self.example_models[0], {"K": 3, "dt": 0.1}, ["layer2"]))
        # Every ablation choice once, on one stage (they build the same layer everywhere).
        defaults = {o.name: o.default for o in self.options}
        for name, choices in (("velocity", VELOCITIES), ("diffusivity", DIFFUSIVITIES),
                              ("init_block", INIT_BLOCKS), ("bn_eps", BN_EPS),
                              ("act", ACTS), ("h_prev", H_PREV),
                              ("velocity_from", VELOCITY_FROM)):
            # h_prev and velocity_from act through an init block (H^0 = f without one).
            extra = {"init_block": "pwconv"} if name in ("h_prev", "velocity_from") else {}
            cases += [(self.example_models[0], {name: c, **extra}, ["layer2"])
                      for c in choices if c != defaults[name]]
        cases.append((self.example_models[0], {"dx": 2, "dy": 3}, ["layer1"]))
        cases.append((self.example_models[0], {"residual": True, "source": False}, ["layer3"]))
        cases.append((self.example_models[0], {"init_block": "basicblock", "separable": True,
                                               "diffusivity": "constant", "cdx": 0.5},
                       ["layer2"]))
        cases.append(("cifar_resnet32", {"layout": "paper", "widths": "32/64/128"}, None))
        cases.append(("cifar_densenet_bc100", {"layout": "paper", "dense_layers": 2,
                                               "init_block": "basicdense"}, None))
        cases.append(("cifar_darts_v2", {"layout": "paper", "cells": 5}, None))
        if importlib.util.find_spec("timm") is not None:  # timm is an optional extra
            cases.append(("timm:mobilenetv3_large_100", {"layout": "paper"}, None))
        return cases

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        return site.kind == ("network" if options["layout"] == "paper" else "stage")

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["layout"] == "paper" and site.module_type in _REBUILT_FROM:
            root = analysis.module(site)
            missing = [a for a in _REBUILT_FROM[site.module_type] if not hasattr(root, a)]
            if missing:
                return (f"layout=paper rebuilds autobuild's {site.module_type} from its "
                        f"{', '.join(missing)}; this {site.module_type} has no such "
                        f"attribute (another class of the same name?)")
        if options["layout"] == "paper" and site.module_type not in _PAPER_OPTIONS:
            return (f"layout=paper builds the official CIFAR ResNet-, DenseNet- or "
                    f"DARTS-Global or ImageNet Global networks and replaces a "
                    f"cifar_resnet*, cifar_densenet_bc*, cifar_darts_v2 or {MOBILE_BASELINES} "
                    f"baseline, not a {site.module_type} (layout=plain converts the residual "
                    f"stages of any ResNet)")
        if options["layout"] == "paper" and site.module_type in MOBILE:
            return mobile_refusal(analysis.module(site))
        return ""

    def hint_without_sites(self, sites: Sequence[Site], options: dict[str, Any]) -> str:
        network = next((s for s in sites if s.kind == "network"), None)
        if options["layout"] != "paper" and network and network.module_type in MOBILE:
            # torchvision's classes share these names: say which baselines convert.
            return (f"with --option layout=paper, {MOBILE_BASELINES} convert into the official "
                    f"{', '.join(MOBILE_NAMES.values())}")
        if options["layout"] != "paper" and network and network.module_type in _PAPER_OPTIONS:
            extra = " --option init_block=basicdense" if network.module_type == DENSENET else ""
            return (f"--option layout=paper{extra} converts this network into the official "
                    f"{_PAPER_NAMES[network.module_type]}")
        return ""

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str,
              analysis: Analysis) -> None:
        super().check(sites, options, init, analysis)
        if not math.isfinite(options["dt"]) or options["dt"] <= 0:
            raise InfeasiblePlacement(f"pde-global needs a finite dt > 0 (got dt="
                                      f"{options['dt']}); e.g. --option dt=0.2")
        self._check_network_options(sites, options)
        try:
            velocity, diffusivity = resolve_coeffs(options["coeffs"], options["velocity"],
                                                   options["diffusivity"])
        except AutobuildError as e:
            raise InfeasiblePlacement(f"pde-global: {e}") from None
        unused = [n for n in ("cdx", "cdy") if options[n] != 1.0]
        if unused and diffusivity != "constant":
            raise InfeasiblePlacement(f"option {unused[0]} of pde-global sets a constant "
                                      f"diffusivity; add --option diffusivity=constant (or "
                                      f"coeffs=constant_diffusivity) or drop it")
        useless = _without_effect(options, {s.module_type for s in sites}, velocity)
        if useless:
            name, why = useless
            raise InfeasiblePlacement(f"option {name} of pde-global changes nothing here "
                                      f"({why}); drop it")

    def _check_network_options(self, sites: Sequence[Site], options: dict[str, Any]) -> None:
        """The options that shape a layout=paper network belong to one kind of baseline."""
        defaults = {o.name: o.default for o in self.options}
        types = {s.module_type for s in sites}
        for kind, names in _PAPER_OPTIONS.items():
            for name in names:
                if options[name] == defaults[name]:
                    continue
                if options["layout"] != "paper":
                    raise InfeasiblePlacement(f"option {name} of pde-global applies to "
                                              f"layout=paper only; add --option layout=paper "
                                              f"or drop it")
                if kind not in types:
                    raise InfeasiblePlacement(f"option {name} of pde-global layout=paper "
                                              f"applies to {_BASELINE_NAMES[kind]} baseline "
                                              f"only; drop it")
        if options["layout"] == "paper" and types & set(MOBILE):
            # The official arch strings fix every Global block's settings.
            changed = [n for n in defaults if n != "layout" and options[n] != defaults[n]]
            if changed:
                raise InfeasiblePlacement(f"option {changed[0]} of pde-global: the official "
                                          f"ImageNet Global networks fix each Global block's "
                                          f"settings (their arch strings); drop it")
        if (options["layout"] == "paper" and DARTS in types
                and options["init_block"] != "identity"):
            raise InfeasiblePlacement("the Global layers of DARTS-Global start from a DARTS "
                                      "cell (the official cell_type DartCell); drop "
                                      "init_block")

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
            layer = GlobalLayer(site.out_channels, **_layer_kwargs(options))
        return count_replacement(layer, site.output_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        kwargs = _layer_kwargs(options)
        if options["layout"] == "paper":
            root = rewriter.root_module
            net, note = paper_network(site.module_type, root, options, kwargs)
            rewriter.set_root(site, _like(net, root), note=note)
            return
        stage = rewriter.module(site)
        first = next(iter(stage.children()))
        layer = _like(GlobalLayer(site.out_channels, **kwargs), first)
        # Named "pde", not "global": fx generates Python code with child names in it.
        rewriter.replace(site, nn.Sequential(OrderedDict([("0", first), ("pde", layer)])),
                         note=f"block 0 kept, {len(stage) - 1} block(s) -> Global layer")


register_family(PdeGlobalVariant)
