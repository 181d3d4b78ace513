"""QLNet presets (qlnet10m, qlnet26), softball and the shared-kernel depthwise conv, against
the formulas of the QLNet author's code (liuyao12/ConvNets-PDE-perspective ``resnet.py``:
``softball``, ``PDEBlock.conv_forward``) and the paper's qlnet-10m counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import Analysis
from autobuild.variants.multiplicative import (
    QLNET_WIDTHS,
    QLBlock,
    SharedDepthwiseConv2d,
    Softball,
    ql_width,
)


def _qlnet_params(layers: tuple[int, ...], classes: int = 1000, dw_kernels: int = 0) -> int:
    """QLNet's parameter count written out block by block (BN: 2 per channel)."""
    total = 3 * 64 * 49 + 2 * 64                                  # stem conv + BN
    inplanes = QLNET_WIDTHS[0]
    for i, (planes, n) in enumerate(zip(QLNET_WIDTHS, layers, strict=True)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            w = ql_width(inplanes)
            total += inplanes * 2 * w + 2 * 2 * w                 # conv1 + BN1
            total += 9 * (dw_kernels or w) + 2 * w                # depthwise + BN2
            total += w * planes + 2 * planes                      # conv3 + BN3
            if stride != 1 or inplanes != planes:
                total += inplanes * planes + 2 * planes           # skip conv + BN
            inplanes = planes
    return total + 512 * classes + classes


@pytest.mark.parametrize("name,layers,params,macs", [
    # qlnet-10m: paper 10.06M params / 2.42 GMACs at 224x224
    ("qlnet10m", (3, 4, 6, 3), 10_064_296, 2_418_443_264),
    ("qlnet26", (2, 2, 2, 2), 4_803_624, 1_240_260_608),
])
def test_presets_count(name: str, layers: tuple, params: int, macs: int) -> None:
    a = Analysis(resolve_baseline(name, device="meta"))
    assert (a.counts.params, a.counts.macs) == (params, macs)
    assert params == _qlnet_params(layers)


def test_qlnet26_preset_is_resnet18_with_the_qlnet_layout() -> None:
    a = Analysis(resolve_baseline("resnet18", device="meta"))  # [2, 2, 2, 2] blocks
    got = a.cost(a.select("multiplicative", None, {"layout": "qlnet"}))
    assert (got.params, got.macs) == (4_803_624, 1_240_260_608)


def test_qlnet10m_preset_is_resnet50_with_the_qlnet_layout() -> None:
    a = Analysis(resolve_baseline("resnet50", device="meta"))
    got = a.cost(a.select("multiplicative", None, {"layout": "qlnet"}))
    assert (got.params, got.macs) == (10_064_296, 2_418_443_264)
    shared = a.cost(a.select("multiplicative", None, {"layout": "qlnet", "dw_kernels": 8}))
    assert shared.params == _qlnet_params((3, 4, 6, 3), dw_kernels=8)
    assert shared.macs == got.macs  # the same convolution, fewer distinct weights


def test_softball_matches_the_authors_formula_and_is_smooth_at_zero() -> None:
    x = torch.randn(2, 6, 3, 3) * 4
    x[0, :, 0, 0] = 0
    ref = x / torch.sqrt(1 + (x * x).sum(1, keepdim=True) / x.shape[1])
    torch.testing.assert_close(Softball()(x), ref, rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)
    Softball()(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad[0, :, 0, 0], torch.ones(6))  # the identity near 0


def test_shared_depthwise_matches_the_authors_conv_forward() -> None:
    torch.manual_seed(0)
    conv = SharedDepthwiseConv2d(12, 4, stride=2)
    assert conv.weight.numel() == 4 * 9
    x = torch.randn(2, 12, 7, 7)
    # conv_forward: the kernel bank repeated over the channel groups, one group per channel
    ref = F.conv2d(x, conv.weight.repeat(3, 1, 1, 1), None, 2, 1, 1, 12)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(conv.to_conv()(x), ref, rtol=0, atol=1e-6)
    assert torch.equal(conv.full_weight()[5], conv.weight[1])  # channel 5 uses kernel 5 mod 4


def test_block_options_build_and_refuse() -> None:
    torch.manual_seed(0)
    m = autobuild.convert("cifar_resnet20", "multiplicative",
                          options={"ball": "soft", "hardball": "all", "dw_kernels": 4})
    blocks = [b for b in m.modules() if isinstance(b, QLBlock)]
    assert len(blocks) == 9 and all(isinstance(b.hardball, Softball) for b in blocks)
    assert all(isinstance(b.conv2, SharedDepthwiseConv2d) for b in blocks)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(AutobuildError, match="dw_kernels=3 does not divide"):
        autobuild.convert("cifar_resnet20", "multiplicative", options={"dw_kernels": 3})
