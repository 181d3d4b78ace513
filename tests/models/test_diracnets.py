"""DiracNets presets (v1 with NCReLU, v2; CIFAR by depth and width, ImageNet 18/34) and the
1d/3d Dirac convs: counts against the reference code, formulas, folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild
from autobuild.models import build_model, resolve_baseline
from autobuild.variants.dirac import (
    DiracConv1d,
    DiracConv3d,
    DiracConvV1,
    fold,
)

#: Parameters of the reference ``define_diracnet(depth, width, dataset)`` (szagoruyko/
#: diracnets, master = v2 and branch v1), counted by running it on CPU (every tensor of its
#: params dict but the δ tensors and BN running statistics).
REFERENCE_PARAMS = [
    ("cifar_diracnet28_10", 36_450_090), ("cifar_diracnet28_5", 9_124_250),
    ("cifar_diracnet34_1", 466_394), ("cifar_diracnet34_2", 1_854_378),
    ("cifar_diracnet34_4", 7_395_146), ("cifar_diracnet16_1", 173_402),
    ("cifar_diracnet28_1", 368_730), ("cifar_diracnet28_2", 1_465_514),
    ("cifar_diracnet52_1", 759_386),
    ("cifar_diracnet28_10_v1", 72_835_418), ("cifar_diracnet28_5_v1", 18_216_138),
    ("cifar_diracnet34_1_v1", 925_014), ("cifar_diracnet34_2_v1", 3_693_158),
    ("cifar_diracnet34_4_v1", 14_759_046), ("cifar_diracnet16_1_v1", 343_026),
    ("diracnet18", 11_523_368), ("diracnet34", 21_638_952),
    ("diracnet18_v1", 22_501_192), ("diracnet34_v1", 42_710_120),
    ("diracnet18_075_v1", 12_756_600),
]


@pytest.mark.parametrize("name,params", REFERENCE_PARAMS, ids=[n for n, _ in REFERENCE_PARAMS])
def test_diracnet_presets_match_the_reference_code_counts(name: str, params: int) -> None:
    with torch.device("meta"):
        m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == params


def test_v1_conv_is_the_ncrelu_formula_and_delta_is_an_identity() -> None:
    torch.manual_seed(0)
    layer = DiracConvV1(4, 4).double()
    assert layer.alpha.shape == (1,) and layer.alpha.item() == 5.0
    assert layer.beta.item() == pytest.approx(1e-3)
    assert layer.weight.shape == (4, 8, 3, 3)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    xn = torch.cat([x.clamp(min=0), x.clamp(max=0)], 1)
    w = layer.weight / layer.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    ref = F.conv2d(xn, 5.0 * layer.delta + 1e-3 * w, padding=1)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    with torch.no_grad():  # α = 1, β = 0: NCReLU then δ gives max(x,0) + min(x,0) = x
        layer.alpha.fill_(1.0)
        layer.beta.zero_()
    assert torch.allclose(layer(x), x, atol=1e-12)
    # Widening (4 -> 8 = 2·4): δ is the identity on [max(x,0), min(x,0)].
    wide = DiracConvV1(4, 8).double()
    with torch.no_grad():
        wide.alpha.fill_(1.0)
        wide.beta.zero_()
    assert torch.allclose(wide(x), xn, atol=1e-12)


@pytest.mark.parametrize("name", ["cifar_diracnet16_1", "cifar_diracnet16_1_v1"])
def test_presets_run_trace_and_fold_exactly(name: str) -> None:
    base = resolve_baseline(name)
    m = base.module.eval()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
        folded = fold(m)
        assert not any(hasattr(mod, "alpha") for mod in folded.modules())
        assert (folded(x) - y).abs().max() <= 1e-5 * y.abs().max()
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    # The v1 scales have no weight decay either.
    decayed = {id(p) for p in autobuild.param_groups(m, weight_decay=1e-4)[0]["params"]}
    assert all(id(mod.alpha) not in decayed for mod in m.modules() if hasattr(mod, "alpha"))


@pytest.mark.parametrize("cls,conv,bn,shape", [
    (DiracConv1d, nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 4, 9)),
    (DiracConv3d, nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6), (2, 4, 5, 4, 3)),
])
def test_dirac_conv_1d_3d(cls, conv, bn, shape) -> None:
    torch.manual_seed(0)
    conv_fn = F.conv1d if conv.weight.dim() == 3 else F.conv3d
    layer = cls.from_conv(conv).double()
    x = torch.randn(*shape, dtype=torch.float64)
    scale = (-1,) + (1,) * (conv.weight.dim() - 1)
    w = layer.weight / layer.weight.flatten(1).norm(dim=1).view(scale)
    ref = conv_fn(x, 1.0 * layer.delta + 0.1 * w, layer.bias, padding=1)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    # δ is the identity on the first C_in outputs.
    with torch.no_grad():
        layer.beta.zero_()
    assert torch.allclose(layer(x)[:, :4], x, atol=1e-12)  # (the bias starts at zero)
    # preserve computes the plain conv; folding with an eval BN is exact.
    conv = conv.double()
    layer.preserve(conv.weight, conv.bias)
    assert torch.allclose(layer(x), conv(x), atol=1e-12)
    bn = bn.double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    assert torch.allclose(layer.folded(bn)(x), bn(layer(x)), atol=1e-10)
    assert layer.no_weight_decay_params == ("alpha", "beta")
