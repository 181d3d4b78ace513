"""The pde-global family (SPEC 1.4): the Global layer against a direct NumPy implementation
of the official three-level scheme, the stage conversion against a hand-written reference,
and the ResNet-Global counts of the paper and of its official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.models.cifar import CifarResNet
from autobuild.variants.pde_global import COEFFS, GlobalLayer, ResNetGlobal
from tests.conftest import convert_baseline


# ---- a NumPy Global layer, straight from the formulas ---------------------------------------
def _np_bn(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    def col(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()[None, :, None, None]

    return (x - col(bn.running_mean)) / np.sqrt(col(bn.running_var) + bn.eps) * col(
        bn.weight) + col(bn.bias)


def _np_coefficient(x: np.ndarray, coef: nn.Module) -> np.ndarray:
    """ReLU(BN(depthwise 3x3 conv with zero padding 1)), as a cross-correlation."""
    w = coef.conv.weight.detach().numpy()  # (C, 1, 3, 3)
    _, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros_like(x)
    for a in range(3):
        for b in range(3):
            out += w[None, :, 0, a, b, None, None] * xp[:, :, a:a + h, b:b + wd]
    return np.maximum(_np_bn(out, coef.bn), 0.0)


def _np_scheme(f: np.ndarray, u: np.ndarray, v: np.ndarray, dxx: np.ndarray, dyy: np.ndarray,
               steps: int, dt: float) -> np.ndarray:
    """The official update (global_layer.py, dx = dy = 1), point by point, with periodic
    neighbours taken by index arithmetic (no roll) over the two spatial axes."""
    rows, cols = f.shape[2:]
    prev, cur = f, f  # H^-1 = f, H^0 = h = f
    for _ in range(steps):
        new = np.empty_like(f)
        for i in range(rows):
            for j in range(cols):
                im, ip, jm, jp = (i - 1) % rows, (i + 1) % rows, (j - 1) % cols, (j + 1) % cols
                ux = (u[:, :, im, j] - u[:, :, ip, j]) / 2
                vy = (v[:, :, i, jm] - v[:, :, i, jp]) / 2
                ax, ay = u[:, :, i, j] * dt, v[:, :, i, j] * dt
                bx, by = dxx[:, :, i, j] * dt, dyy[:, :, i, j] * dt
                e = (ux + vy) * dt
                d = 1.0 / (1 + 2 * bx + 2 * by)
                new[:, :, i, j] = d * ((1 - 2 * bx - 2 * by) * prev[:, :, i, j]
                                       - 2 * e * cur[:, :, i, j]
                                       + (-ax + 2 * bx) * cur[:, :, im, j]
                                       + (ax + 2 * bx) * cur[:, :, ip, j]
                                       + (-ay + 2 * by) * cur[:, :, i, jm]
                                       + (ay + 2 * by) * cur[:, :, i, jp]) \
                    + d * 2 * dt * f[:, :, i, j]
        prev, cur = cur, new
    return cur


def _np_global(layer: GlobalLayer, x: torch.Tensor) -> np.ndarray:
    f = x.detach().double().numpy()
    zeros, ones = np.zeros_like(f), np.ones_like(f)
    u = _np_coefficient(f, layer.u) if layer.coeffs != "constant" else zeros
    v = _np_coefficient(f, layer.v) if layer.coeffs != "constant" else zeros
    dxx = _np_coefficient(f, layer.diff_x) if layer.coeffs == "dwconv" else ones
    dyy = _np_coefficient(f, layer.diff_y) if layer.coeffs == "dwconv" else ones
    h = _np_scheme(f, u, v, dxx, dyy, layer.steps, layer.dt)
    return np.maximum(_np_bn(h, layer.bn_out), 0.0)


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.3)  # some positive coefficients
        elif isinstance(m, nn.Conv2d):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("steps,dt", [(1, 0.2), (3, 0.15)])
def test_global_layer_matches_numpy_scheme(coeffs: str, steps: int, dt: float) -> None:
    torch.manual_seed(0)
    layer = GlobalLayer(3, steps, dt, coeffs).double().eval()
    _randomize(layer)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)  # H != W catches swapped axes
    with torch.no_grad():
        y = layer(x).numpy()
    ref = _np_global(layer, x)
    assert np.abs(y - ref).max() <= 1e-10 * max(1.0, np.abs(ref).max())
    assert np.abs(ref).max() > 0.1  # the comparison is not vacuous


def test_channels_never_mix() -> None:
    """Periodic borders roll the spatial axes only: channel c's output depends on channel c."""
    layer = GlobalLayer(4, 2).eval()
    _randomize(layer)
    x = torch.randn(1, 4, 6, 6)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        d = (layer(x) - layer(x2)).abs().amax(dim=(0, 2, 3))
    assert d[0] > 0 and torch.all(d[1:] == 0)


# ---- plain layout: a stage = its first block + a Global layer ------------------------------
def test_stage_conversion_matches_reference() -> None:
    torch.manual_seed(0)
    base = resolve_baseline("cifar_resnet20")
    conv = convert_baseline(base, "pde-global")
    assert conv.plan.sites == ["layer1", "layer2", "layer3"]
    m = conv.model.eval()
    # The first block keeps the baseline's weights.
    assert torch.equal(m.layer2[0].conv1.weight, base.module.layer2[0].conv1.weight)
    _randomize(m)
    for name, channels in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        stage = getattr(m, name)
        assert [type(c).__name__ for c in stage] == ["CifarBasicBlock", "GlobalLayer"]
        assert stage.get_submodule("pde").channels == channels
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        h = m.layer1[0](x)
        ref = _np_global(m.layer1.get_submodule("pde"), h)
        # float32 model vs float64 reference: relative to the largest output.
        assert np.abs(m.layer1(x).double().numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_plain_counts_on_cifar_resnet32() -> None:
    base = resolve_baseline("cifar_resnet32")
    m = convert_baseline(base, "pde-global").model
    before = autobuild.count(base.module, (3, 32, 32))
    after = autobuild.count(m, (3, 32, 32))
    dropped = sum(p.numel() for stage in (base.module.layer1, base.module.layer2,
                                          base.module.layer3)
                  for blk in list(stage)[1:] for p in blk.parameters())
    # Each Global layer: 4 depthwise 3x3 convs (36·C) and 5 BNs (10·C).
    added = 46 * (16 + 32 + 64)
    assert after.params == before.params - dropped + added == 80_442
    assert after.macs < before.macs / 5


def test_one_block_stages_get_a_global_layer_and_resnet18_converts() -> None:
    base = resolve_baseline(CifarResNet(8), input_size=(3, 32, 32))
    m = convert_baseline(base, "pde-global").model
    assert all(isinstance(getattr(m, n)[1], GlobalLayer) for n in ("layer1", "layer2", "layer3"))
    r18 = resolve_baseline("resnet18", input_size=(3, 64, 64))
    m18 = convert_baseline(r18, "pde-global", options={"coeffs": "constant"}).model
    assert [len(getattr(m18, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert m18(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# ---- paper layout: the official ResNet-Global ----------------------------------------------
def test_paper_layout_reproduces_resnet_global_counts() -> None:
    base = resolve_baseline("cifar_resnet32", num_classes=100)
    conv = convert_baseline(base, "pde-global", options={"layout": "paper"})
    m = conv.model
    assert isinstance(m, ResNetGlobal) and conv.plan.sites == ["network"]
    assert [m.get_submodule(f"layer{i}")[0].conv2.out_channels for i in range(1, 5)] == [
        16, 32, 64, 64]
    assert [len(m.get_submodule(f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert [m.get_submodule(f"global{i}").channels for i in range(1, 4)] == [16, 32, 64]
    assert m.fc.out_features == 100  # num_classes follows the baseline
    c = autobuild.count(resolve_baseline("cifar_resnet32").module, (3, 32, 32))
    assert abs(c.params - 473e3) <= 0.05 * 473e3 and abs(c.macs - 70e6) <= 0.05 * 70e6
    ten = convert_baseline(resolve_baseline("cifar_resnet32"), "pde-global",
                        options={"layout": "paper"}).model
    c = autobuild.count(ten, (3, 32, 32))
    assert c.params == 161_402  # the official code's 161K
    assert abs(c.macs - 14.8e6) <= 0.05 * 14.8e6  # official code
    assert abs(c.params - 168e3) <= 0.05 * 168e3 and abs(c.macs - 15e6) <= 0.05 * 15e6  # paper


def test_stencil_flops_are_counted() -> None:
    """Per step and element: 17 elementwise ops with learned velocity, 9 without (roll: 0)."""
    x = (16, 8, 8)
    n = 16 * 8 * 8
    for coeffs, per_step in (("dwconv", 17), ("constant_diffusivity", 17), ("constant", 9)):
        one = autobuild.count(GlobalLayer(16, 1, coeffs=coeffs), x)
        three = autobuild.count(GlobalLayer(16, 3, coeffs=coeffs), x)
        assert three.flops - one.flops == 2 * per_step * n
        assert three.macs == one.macs


# ---- refusals ----------------------------------------------------------------------------
def test_refusals() -> None:
    with pytest.raises(AutobuildError, match=r"^pde-global converts stage sites and cifar_vgg16 "
                                             r"has none; it applies to e\.g\. cifar_resnet20"):
        convert_baseline(resolve_baseline("cifar_vgg16"), "pde-global")
    r20 = resolve_baseline("cifar_resnet20")
    with pytest.raises(AutobuildError, match=r"K=0 of pde-global must be in \[1, 100\]"):
        convert_baseline(r20, "pde-global", options={"K": "0"})
    with pytest.raises(AutobuildError, match="dt=-0.1 of pde-global must be > 0"):
        convert_baseline(r20, "pde-global", options={"dt": "-0.1"})
    with pytest.raises(AutobuildError, match="layout=paper only"):
        convert_baseline(r20, "pde-global", options={"blocks": "2"})
    with pytest.raises(AutobuildError, match="preserve"):
        convert_baseline(r20, "pde-global", init="preserve")
    r18 = resolve_baseline("resnet18", input_size=(3, 64, 64))
    with pytest.raises(AutobuildError, match="cifar_resnet"):
        convert_baseline(r18, "pde-global", options={"layout": "paper"})
