"""pde-global: the official numerics (coefficient BN eps = channel count) and the ablation
options, against a formula-level re-implementation of the official
``GlobalFeatureBlock_Diffusion.forward`` and against the official code's parameter counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.ops import plain_ops
from autobuild.rewrite import Choice, Placement
from autobuild.variants.pde_global import GlobalLayer, ResNetGlobal
from tests.conftest import convert_baseline
from tests.variants.pde_reference import official_stencil


def _bn(m: nn.BatchNorm2d, x: Tensor, eps: float, training: bool) -> Tensor:
    # Copies of the running statistics: the reference must not move the module's.
    return F.batch_norm(x, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias,
                        training, 0.1, eps)


def official_forward(layer: GlobalLayer, f: Tensor, training: bool = False) -> Tensor:
    """The official forward written out: the coefficient BNs with eps = the channel count
    (``norm_layer(planes, planes)``), D = 1/(1 + 2Bx + 2By) as a product, the stencil with
    its rolled copies, the source added after the stencil (the official order). The maps
    before the BNs (convs, blocks) are the layer's own modules, called as they are."""
    c = f.shape[1]
    eps = float(c)

    act = F.silu if layer.act_name == "silu" else F.relu  # the official use_silu

    def coeff(m: Any, h: Tensor) -> Tensor:
        return act(_bn(m.bn, m.conv(h), eps, training))

    h = layer.init_block(f) if layer.init_block is not None else f
    h0 = h if layer.h_prev == "init_block" else f  # the official init_h0_h
    g0 = f if layer.velocity_from == "f" else h  # the official use_f_for_g
    zero = torch.zeros_like(f)
    if layer.velocity == "isotropic":  # the official use_dot, velocity half
        g = g1 = act(_bn(layer.u.bn, layer.u.conv(g0), eps, training) * coeff(layer.v, g0))
    else:
        g = coeff(layer.u, g0) if layer.u is not None else zero
        g1 = coeff(layer.v, g0) if layer.v is not None else zero
    if layer.diffusivity == "constant":  # the official constant_Dxy: cDx, cDy
        d_x: Tensor | float = layer.cdx
        d_y: Tensor | float = layer.cdy
    elif layer.diffusivity == "none":
        d_x = d_y = 0.0
    elif layer.diffusivity == "isotropic":  # the official use_dot
        d_x = d_y = act(_bn(layer.diff_x.bn, layer.diff_x.conv(h), eps, training)
                        * coeff(layer.diff_y, h))
    else:
        d_x, d_y = coeff(layer.diff_x, h), coeff(layer.diff_y, h)
    h = official_stencil(f, h, h0, g, g1, d_x, d_y, layer.dt, layer.dx, layer.dy,
                         layer.steps, layer.source)
    out = act(_bn(layer.bn_out, h, 1e-5, training))
    return out + f if layer.residual else out  # the official use_res


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.3)


ABLATIONS: list[dict[str, Any]] = [
    {}, {"coeffs": "constant"}, {"coeffs": "constant_diffusivity"},
    *({"velocity": k} for k in ("identity", "basicblock", "bottleneck", "dwconv_bias",
                                "pwconv", "fullconv", "none")),
    *({"diffusivity": k} for k in ("identity", "basicblock", "isotropic", "none")),
    {"init_block": "basicblock"}, {"init_block": "bottleneck"},
    {"dx": 2, "dy": 1, "steps": 3}, {"diffusivity": "none", "velocity": "pwconv", "steps": 2},
    {"residual": True}, {"source": False, "steps": 2},
    # The official --use_silu, --init_h0_h, --use_f_for_g, use_dot, --cDx/--cDy, --separable.
    {"act": "silu"}, {"act": "silu", "coeffs": "constant"},
    {"init_block": "basicblock", "h_prev": "init_block", "steps": 2},
    {"init_block": "bottleneck", "velocity_from": "f"},
    {"velocity": "isotropic", "diffusivity": "isotropic"},
    {"diffusivity": "constant", "cdx": 0.5, "cdy": 2.0},
    {"init_block": "basicblock", "velocity": "basicblock", "separable": True},
    {"init_block": "basicdense", "velocity": "basicdense"},
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("training", [False, True])
def test_global_layer_matches_the_official_formula(options: dict, training: bool) -> None:
    torch.manual_seed(0)
    layer = GlobalLayer(6, **options).double()
    _randomize(layer)
    layer.train(training)
    # requires_grad: in training mode the fused op runs where it applies.
    f = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=training)
    ref = official_forward(layer, f, training)
    y = layer(f)
    assert (y - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("options", [{}, {"velocity": "identity"},
                                     {"diffusivity": "basicblock"}])
def test_fused_training_equals_plain_autograd(options: dict) -> None:
    torch.manual_seed(0)
    layer = GlobalLayer(4, 2, **options).double().train()
    f = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    outs = []
    for plain in (False, True):
        layer.zero_grad()
        f.grad = None
        if plain:
            with plain_ops():
                y = layer(f)
        else:
            y = layer(f)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append([y.detach(), f.grad.clone(), *(p.grad.clone() for p in layer.parameters())])
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_paper_layout_reproduces_the_official_numerics() -> None:
    """The whole ResNet-Global with each Global layer recomputed by the official formula;
    bn_eps=1e-5 (autobuild's former behaviour) moves the logits by ~9%."""
    base = resolve_baseline("cifar_resnet32")
    torch.manual_seed(0)
    m = convert_baseline(base, "pde-global", options={"layout": "paper"}).model.eval()
    _randomize(m)
    assert [m.get_submodule(f"global{i}").u.bn.eps for i in (1, 2, 3)] == [16.0, 32.0, 64.0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
        hooks = [m.get_submodule(f"global{i}").register_forward_hook(
            lambda mod, inp, out: official_forward(mod, inp[0])) for i in (1, 2, 3)]
        ref = m(x)
        for hk in hooks:
            hk.remove()
        other = ResNetGlobal(bn_eps="1e-5").eval()
        other.load_state_dict(m.state_dict())
        y_default_eps = other(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (y_default_eps - ref).abs().max() >= 0.05 * ref.abs().max()


#: Parameters of the official ResNet-Global (pdenet, -m 1 --n1 16 --n2 32 --n3 64 --n4 64
#: --non_linear --K 1) with each flag, counted by instantiating the official model.py on CPU
#: (timm 1.0: its efficientnet_blocks import renamed, nothing else changed).
OFFICIAL_PARAMS: list[tuple[dict[str, Any], int]] = [
    ({}, 161_402), ({"blocks": 2}, 332_602), ({"coeffs": "constant_diffusivity"}, 158_938),
    ({"velocity": "identity"}, 159_386), ({"velocity": "dwconv_bias"}, 161_626),
    ({"velocity": "basicblock"}, 353_818), ({"velocity": "bottleneck"}, 279_002),
    ({"velocity": "pwconv"}, 170_362), ({"velocity": "fullconv"}, 256_378),
    ({"diffusivity": "identity"}, 159_386), ({"diffusivity": "basicblock"}, 353_818),
    ({"diffusivity": "bottleneck"}, 279_002), ({"diffusivity": "fullconv"}, 256_378),
    ({"init_block": "basicblock"}, 258_618), ({"init_block": "bottleneck"}, 221_210),
    # --separable; -o (three stages, -m 1 and -m 2); --n1 6 --n2 8 --n3 16 --n4 16;
    # WideResnet-Global -m 1 -wdt 4 (n1..n3 = 16/32/64 x 4, cell_type BasicBlock), and its
    # small variant --n1 3 --n2 4 --n3 3 -wdt 4 (the runner's "22K" line).
    ({"separable": True}, 33_066), ({"widths": (16, 32, 64)}, 83_194),
    ({"widths": (16, 32, 64), "blocks": 2}, 180_410), ({"widths": (6, 8, 16, 16)}, 12_140),
    ({"widths": (64, 128, 256), "init_block": "basicblock"}, 2_798_282),
    ({"widths": (12, 16, 12), "init_block": "basicblock"}, 22_518),
    ({"init_block": "basicdense"}, 269_594), ({"velocity": "basicdense"}, 375_770),
]


@pytest.mark.parametrize("options,params", OFFICIAL_PARAMS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default"
                              for o, _ in OFFICIAL_PARAMS])
def test_ablation_counts_match_the_official_code(options: dict, params: int) -> None:
    with torch.device("meta"):
        m = ResNetGlobal(**options)
    assert sum(p.numel() for p in m.parameters()) == params


def test_ablation_options_on_a_plan_and_their_refusals() -> None:
    r20 = resolve_baseline("cifar_resnet20")
    conv = convert_baseline(r20, "pde-global", sites=["layer2"],
                            options={"velocity": "basicblock", "diffusivity": "isotropic",
                                     "dx": "2"})
    layer = conv.model.layer2.get_submodule("pde")
    assert (layer.velocity, layer.diffusivity, layer.dx) == ("basicblock", "isotropic", 2)
    c = autobuild.count(conv.model, (3, 32, 32))
    assert conv.analysis.cost(conv.plan.placement).params == c.params
    with pytest.raises(AutobuildError, match="coeffs=constant sets velocity=none"):
        convert_baseline(r20, "pde-global", options={"coeffs": "constant",
                                                     "velocity": "identity"})
    with pytest.raises(AutobuildError, match="velocity='x' of pde-global is not valid"):
        convert_baseline(r20, "pde-global", options={"velocity": "x"})
    # The float 1e-5 (Python, YAML's 1.0e-5) is the choice "1e-5".
    conv = convert_baseline(r20, "pde-global", sites=["layer2"], options={"bn_eps": 1e-5})
    assert conv.plan.placement["layer2"].opts["bn_eps"] == "1e-5"
    # widths: commas (the official flags' habit) and spaces are one canonical spelling, and
    # the short choice form (options separated by commas) carries it.
    r32 = resolve_baseline("cifar_resnet32")
    keys = {convert_baseline(r32, "pde-global", options={"layout": "paper", "widths": w}
                             ).plan.placement.key for w in ("32,64,128", "32/ 64/128")}
    choice = Choice.parse("pde-global:layout=paper,widths=32/64/128")
    assert len(keys) == 1 and choice.opts["widths"] == "32/64/128"
    assert Placement({"network": str(choice)}).key in keys
    for options, message in (
            ({"layout": "paper", "widths": "16/32"}, "give 3 or 4 channel counts"),
            ({"layout": "paper", "widths": "16/x/64"}, "give 3 or 4 channel counts"),
            ({"layout": "paper", "widths": "16/32/64/99999"}, r"in \[1, 4096\]"),
            ({"widths": "8/8/8"}, "widths of pde-global applies to layout=paper"),
            # Options that would change nothing are refused (one network, one placement).
            ({"separable": True}, "option separable of pde-global changes nothing"),
            ({"h_prev": "init_block"}, "option h_prev of pde-global changes nothing"),
            ({"velocity_from": "f", "init_block": "pwconv", "velocity": "none"},
             "option velocity_from of pde-global changes nothing"),
            ({"cdx": 2.0}, "cdx of pde-global sets a constant diffusivity"),
            ({"layout": "paper", "dense_layers": 4}, "applies to a DenseNet-BC baseline only"),
            ({"act": "gelu"}, "act='gelu' of pde-global is not valid")):
        with pytest.raises(AutobuildError, match=message):
            convert_baseline(resolve_baseline("cifar_resnet32"), "pde-global", options=options)


def test_wide_resnet_global_reproduces_the_official_counts_and_macs() -> None:
    """WRN-40-4-Global (the official runner: 2.8M params, 425M MACs) and ResNet-56-Global
    (330K, 30M) through the CLI's path: a plan on cifar_resnet32 with layout=paper."""
    base = resolve_baseline("cifar_resnet32")
    for options, params, macs in (
            ({"layout": "paper", "widths": "64/128/256", "init_block": "basicblock"},
             2_798_282, 425.3e6),
            ({"layout": "paper", "blocks": 2}, 332_602, 30.1e6)):
        conv = convert_baseline(base, "pde-global", options=options)
        counted = autobuild.count(conv.model, (3, 32, 32))
        assert counted.params == params == conv.analysis.cost(conv.plan.placement).params
        assert abs(counted.macs - macs) < 0.05e6


def test_densenet_global_is_the_official_one() -> None:
    """layout=paper on DenseNet-BC-100 builds the official DenseNet-Global (the runner's
    --model Densenet-Global --n1 8 --n2 8 --n3 8, cell_type BasicDense): 465,442 params and
    132.8M MACs, as the official densenet.DenseNet instantiated here (the runner's comment
    says 526K / 168M, which the official code does not build)."""
    base = resolve_baseline("cifar_densenet_bc100")
    conv = convert_baseline(base, "pde-global",
                            options={"layout": "paper", "init_block": "basicdense"})
    counted = autobuild.count(conv.model, (3, 32, 32))
    assert counted.params == 465_442 == conv.analysis.cost(conv.plan.placement).params
    assert abs(counted.macs - 132.77e6) < 0.01e6
    net = conv.model
    layers = [isinstance(net.features.get_submodule(f"global{i}"), GlobalLayer) for i in (1, 2)]
    assert layers == [True, True] and len(net.features.denseblock3) == 8
    # The official names, so the official checkpoints' dense layers load by name.
    assert "features.denseblock1.denselayer1.norm1.weight" in net.state_dict()
    with pytest.raises(AutobuildError, match="widths of pde-global layout=paper applies to a "
                                             "CIFAR ResNet"):
        convert_baseline(base, "pde-global", options={"layout": "paper", "widths": "8/8/8"})
    # The baseline's compression is kept (the official DenseNet's argument).
    from autobuild.models.cifar import CifarDenseNet

    wide = CifarDenseNet(12, (4, 4, 4), compression=1.0)
    g = autobuild.convert(wide, "pde-global", options={"layout": "paper", "dense_layers": 2},
                          input_size=(3, 32, 32))
    assert g.features.transition1.conv.out_channels == 24 + 2 * 12
    small = convert_baseline(base, "pde-global", options={"layout": "paper", "dense_layers": 2})
    y = small.model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert y.shape == (2, 10)


def test_darts_global_is_the_official_one() -> None:
    """layout=paper on DARTS-V2 builds the official DARTS-Global (the runner's --model
    DARTS-Global -m 6 --n1 36): a Global layer whose H^0 is a normal DARTS cell before each
    reduction cell; 791,938 params and 210.9M MACs as the official darts.py instantiated
    here (auxiliary=False; the runner's comment says 783K / 213M)."""
    base = resolve_baseline("cifar_darts_v2")
    conv = convert_baseline(base, "pde-global", options={"layout": "paper"})
    counted = autobuild.count(conv.model, (3, 32, 32))
    assert counted.params == 791_938 == conv.analysis.cost(conv.plan.placement).params
    assert abs(counted.macs - 210.93e6) < 0.01e6
    globals_ = [i for i, c in enumerate(conv.model.cells) if isinstance(c, GlobalLayer)]
    assert globals_ == [2, 5] and len(conv.model.cells) == 8
    y = conv.model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert y.shape == (2, 10)
    with pytest.raises(AutobuildError, match="start from a DARTS cell"):
        convert_baseline(base, "pde-global", options={"layout": "paper",
                                                      "init_block": "basicblock"})
    with pytest.raises(AutobuildError, match="cells of pde-global layout=paper applies to a "
                                             "DARTS baseline only"):
        convert_baseline(resolve_baseline("cifar_resnet32"), "pde-global",
                         options={"layout": "paper", "cells": 9})
    with pytest.raises(AutobuildError, match="--option layout=paper converts this network "
                                             "into the official DARTS-Global"):
        convert_baseline(base, "pde-global")


def test_a_foreign_class_of_a_known_name_is_refused_not_crashed() -> None:
    class CifarDenseNet(nn.Module):  # a user's network, not autobuild's DenseNet-BC
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(AutobuildError, match="rebuilds autobuild's CifarDenseNet from its "
                                             "growth, block_config"):
        autobuild.convert(CifarDenseNet(), "pde-global", options={"layout": "paper"},
                          input_size=(3, 32, 32))
    with pytest.raises(AutobuildError, match="--option layout=paper --option "
                                             "init_block=basicdense converts"):
        autobuild.convert("cifar_densenet_bc100", "pde-global")
