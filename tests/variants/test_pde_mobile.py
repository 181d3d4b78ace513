"""pde-global layout=paper on timm's MobileNetV2, EfficientNet-B0 and MobileNetV3-Large: the
official ImageNet Global networks (``imagenet_global_models.py``), against the official
code's parameter counts and a formula-level re-implementation of its Global block."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import autobuild
from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.models import resolve_baseline
from autobuild.variants._pde_mobile import (
    MOBILE_ARCHS,
    InvertedResidualGlobal,
    build_mobile_global,
    split_gr,
)
from tests.conftest import convert_baseline
from tests.variants.pde_reference import official_stencil

pytest.importorskip("timm")

#: Parameters at 1000 classes, measured by running the official global_* builders (with
#: timm 1.0.31); their new_* baselines count exactly timm's 3,504,872 / 5,288,548 / 5,483,032.
OFFICIAL_PARAMS = {"mobilenetv2_100": 2_952_232, "efficientnet_b0": 3_822_932,
                   "mobilenetv3_large_100": 3_868_160}


def _globals(net: nn.Module) -> list[InvertedResidualGlobal]:
    return [m for m in net.modules() if isinstance(m, InvertedResidualGlobal)]


def _randomize(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def official_block(block: InvertedResidualGlobal, x: Tensor) -> Tensor:
    """``GlobalFeatureBlock_Diffusion.forward`` of the official code with constant_Dxy, written
    out (f, h0, g0, the use_dot field, then the official stencil); the inverted residual,
    convs and BNs are the block's own modules."""
    act = block.act
    f = x
    h = block.init_block(f)
    if block.reshapes:  # the official: stride != 1 or in_chs != out_chs
        f = h
    h0, g0 = f, h
    bng, convg, bng1, convg1 = block.u.bn, block.u.conv, block.v.bn, block.v.conv
    if block.velocity == "isotropic":  # use_dot
        g = act(bng(convg(g0)) * act(bng1(convg1(g0))))
        g1 = g
    else:
        g, g1 = act(bng(convg(g0))), act(bng1(convg1(g0)))
    h = official_stencil(f, h, h0, g, g1, block.cdx, block.cdy, block.dt, block.dx, block.dy,
                         block.steps)
    return act(block.bn_out(h))


@pytest.mark.parametrize("arch", list(MOBILE_ARCHS))
def test_counts_equal_the_official_code(arch: str) -> None:
    net = build_mobile_global(arch, 1000, 3)
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMS[arch]
    gr = sum(b.startswith("gr") for stage in MOBILE_ARCHS[arch] for b in stage)
    assert len(_globals(net)) == gr


def test_gr_strings_decode_as_the_official_builder() -> None:
    ir, s = split_gr("gr_r1_k5_s1_e6_c40_se0.25_j1_xy1_rs1_udot1_dx2_dy2_dt0.1_cDx2._cDy2.")
    assert ir == "ir_r1_k5_s1_e6_c40_se0.25"
    assert s == {"steps": 1, "dt": 0.1, "dx": 2, "dy": 2, "cdx": 2.0, "cdy": 2.0,
                 "velocity": "isotropic", "kernel_size": 5, "act": None}
    ir, s = split_gr("gr_r1_k3_s1_e6_c24_nre_j1_rs1_xy1")
    assert ir == "ir_r1_k3_s1_e6_c24_nre"
    assert (s["velocity"], s["act"], s["dt"], s["cdx"]) == ("dwconv", "relu", 0.2, 1.0)
    with pytest.raises(AutobuildError, match="constant-diffusivity"):
        split_gr("gr_r1_k3_s1_e6_c24_j1")


@pytest.mark.parametrize("arch", list(MOBILE_ARCHS))
@pytest.mark.parametrize("training", [False, True])
def test_global_blocks_match_the_official_forward(arch: str, training: bool) -> None:
    torch.manual_seed(0)
    net = build_mobile_global(arch, 10, 3)
    _randomize(net)
    net.train(training)
    blocks = _globals(net)
    # Every kind of official block is covered: reshaping (stride 2), use_dot or not,
    # dx = 2, dt 0.1, cDx 2, kernel 5, the ReLU, ReLU6, SiLU and hard-swish activations.
    for block in blocks:
        c_in = block.init_block.conv_pw.in_channels
        x = torch.randn(2, c_in, 12, 12)
        with torch.no_grad():
            want = official_block(block, x)
            got = block(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (arch, block.extra_repr())


def test_block_settings_follow_the_arch_strings() -> None:
    eff = _globals(build_mobile_global("efficientnet_b0", 10, 3))
    assert [(b.dx, b.dt, b.cdx, b.u.conv.kernel_size[0]) for b in eff[:2]] == [
        (1, 0.1, 2.0, 3), (2, 0.1, 2.0, 5)]
    assert {b.act_name for b in eff} == {"silu"}
    assert all(b.velocity == "isotropic" and not b.reshapes for b in eff)
    v2 = _globals(build_mobile_global("mobilenetv2_100", 10, 3))
    assert [b.act_name for b in v2] == ["relu"] * 3 + ["relu6"] * 2
    assert all(b.velocity == "dwconv" and b.u.bn.eps == 1e-5 for b in v2)
    v3 = _globals(build_mobile_global("mobilenetv3_large_100", 10, 3))
    assert [b.act_name for b in v3] == ["relu", "relu"] + ["hardswish"] * 3
    assert [b.reshapes for b in v3] == [False] * 4 + [True]


def test_masked_block_is_its_inverted_residual() -> None:
    block = _globals(build_mobile_global("mobilenetv2_100", 10, 3))[0].eval()
    x = torch.randn(1, block.init_block.conv_pw.in_channels, 8, 8)
    block.masked = True
    with torch.no_grad():
        assert torch.equal(block(x), block.init_block(x))


def test_convert_build_and_load(tmp_path) -> None:
    base = resolve_baseline("timm:mobilenetv2_100", num_classes=10)
    converted = convert_baseline(base, "pde-global", options={"layout": "paper"})
    m = converted.model
    assert len(_globals(m)) == 5
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL_PARAMS["mobilenetv2_100"] - (
        1280 + 1) * (1000 - 10)
    with autobuild.masked(m, "network"):
        assert all(b.masked for b in _globals(m))
    autobuild.save(m, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"))
    x = torch.randn(1, 3, 96, 96)
    m.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_training_rates_carry_over_as_the_official_builder_spreads_them() -> None:
    import timm
    from timm.layers import DropPath

    base = timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.2,
                             drop_path_rate=0.2)
    m = autobuild.convert(base, "pde-global", options={"layout": "paper"})
    assert m.drop_rate == 0.2
    # The official builder: rate * i / n over the Global network's own 12 blocks, in the
    # inverted residuals (the Global part drops nothing: it has no residual).
    n = sum(len(stage) for stage in m.blocks)
    probs = [mod.drop_prob for mod in m.modules() if isinstance(mod, DropPath)]
    assert n == 12 and probs == pytest.approx([0.2 * i / n for i in range(1, n)])
    assert any(isinstance(b.init_block.drop_path, DropPath) for b in _globals(m))


def test_data_config_is_the_baselines() -> None:
    import timm
    from timm.data import resolve_data_config

    base = timm.create_model("mobilenetv3_large_100")
    m = autobuild.convert(base, "pde-global", options={"layout": "paper"})
    assert resolve_data_config(model=m) == resolve_data_config(model=base)
    assert m.pretrained_cfg["architecture"] == "global_mobilenetv3_large_100"
    assert "hf_hub_id" not in m.pretrained_cfg
    # The Global network is not a baseline of layout=paper again.
    with pytest.raises(AutobuildError, match="global_mobilenetv3_large_100"):
        autobuild.convert(m, "pde-global", options={"layout": "paper"})


def test_refusals_name_what_is_allowed() -> None:
    import timm

    with pytest.raises(AutobuildError, match="created with others .*eps=0.001"):
        autobuild.convert(timm.create_model("efficientnet_b0", bn_eps=1e-3), "pde-global",
                          options={"layout": "paper"})
    with pytest.raises(AutobuildError, match="created with others .*ReLU"):
        autobuild.convert(timm.create_model("mobilenetv2_100", act_layer="relu"),
                          "pde-global", options={"layout": "paper"})
    with pytest.raises(AutobuildError, match="timm:mobilenetv2_100, timm:efficientnet_b0"):
        convert_baseline(resolve_baseline("timm:efficientnet_b1"), "pde-global",
                         options={"layout": "paper"})
    with pytest.raises(InfeasiblePlacement, match="option dt .*fix each Global block"):
        convert_baseline(resolve_baseline("timm:efficientnet_b0"), "pde-global",
                         options={"layout": "paper", "dt": 0.1})
    with pytest.raises(AutobuildError, match="with --option layout=paper, timm:mobilenetv2"):
        convert_baseline(resolve_baseline("timm:mobilenetv2_100"), "pde-global")
    with pytest.raises(AutobuildError, match="odd kernel_size"):
        InvertedResidualGlobal(nn.Identity(), 8, False, kernel_size=4)
