"""parameter-free with ``pool=shift``: Wu et al.'s shift (CVPR 2018) in place of a spatial
conv, checked against a depthwise conv with one-hot kernels built here, by gradcheck, by the
counts of converted ResNets, a save/load round trip and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import Analysis, Placement
from autobuild.variants._pf_layers import Shift2d, TokenPoolLayer
from autobuild.variants.parameter_free import ParameterFreeLayer

SHIFT = {"pool": "shift"}


def _one_hot_weight(channels: int, kh: int, kw: int) -> torch.Tensor:
    """The documented grouping, written out independently: taps row by row without the
    centre, then the centre; ``channels // taps`` channels each, the rest to the centre."""
    taps = [(y, x) for y in range(kh) for x in range(kw) if (y, x) != (kh // 2, kw // 2)]
    taps.append((kh // 2, kw // 2))
    size = channels // len(taps)
    w = torch.zeros(channels, 1, kh, kw, dtype=torch.float64)
    for c in range(channels):
        y, x = taps[min(c // size, len(taps) - 1)] if size else taps[-1]
        w[c, 0, y, x] = 1.0
    return w


def _reference(x: torch.Tensor, k: tuple[int, int], s: int, p: tuple[int, int],
               d: int) -> torch.Tensor:
    w = _one_hot_weight(x.shape[1], *k).to(x.dtype)
    return F.conv2d(x, w, stride=s, padding=p, dilation=d, groups=x.shape[1])


# ---- the operation against a one-hot depthwise conv ----------------------------------------
@pytest.mark.parametrize("k,channels", [(3, 10), (3, 13), (3, 4), (5, 27), (5, 53)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (9, 6)])
def test_shift_equals_one_hot_depthwise_conv(k: int, channels: int, stride: int,
                                             hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, channels, *hw, dtype=torch.float64)
    got = Shift2d(channels, k, stride)(x)
    ref = _reference(x, (k, k), stride, (k // 2, k // 2), 1)
    assert got.shape == ref.shape and torch.equal(got, ref)
    # Stride s is the stride-1 shift with every s-th pixel kept.
    assert torch.equal(got, Shift2d(channels, k, 1)(x)[..., ::stride, ::stride])
    xf = x.float()  # float32 too: only copies, so exact in any dtype
    assert torch.equal(Shift2d(channels, k, stride)(xf), ref.float())


@pytest.mark.parametrize("k,s,p,d", [((3, 3), 1, (0, 0), 1), ((3, 3), 2, (0, 1), 1),
                                     ((1, 3), 1, (0, 1), 1), ((5, 3), 2, (2, 1), 1),
                                     ((3, 3), 1, (2, 2), 2), ((3, 3), 2, (6, 6), 6)])
def test_shift_takes_the_convs_padding_and_dilation(k: tuple[int, int], s: int,
                                                    p: tuple[int, int], d: int) -> None:
    """Any padding and dilation: the output has the conv's size and the one-hot conv's
    values (SSD's fc6 is 3x3, dilation 6, padding 6)."""
    torch.manual_seed(0)
    x = torch.randn(1, 11, 9, 8, dtype=torch.float64)
    got = Shift2d(11, k, s, padding=p, dilation=d)(x)
    assert torch.equal(got, _reference(x, k, s, p, d))


def test_shift_translates_with_zero_fill() -> None:
    """Group 0 (tap (0, 0), offset (-1, -1)) of a 3x3 shift reads x[i-1, j-1]: its map
    moves down-right by one, zeros come in at the top and left, nothing wraps around."""
    x = torch.arange(1.0, 1 + 9 * 16).reshape(1, 9, 4, 4)
    y = Shift2d(9, 3, 1)(x)
    assert torch.equal(y[0, 0, 1:, 1:], x[0, 0, :-1, :-1])
    assert not y[0, 0, 0].any() and not y[0, 0, :, 0].any()
    assert torch.equal(y[0, 8], x[0, 8])  # the centre group stays


def test_shift_has_no_parameters_and_never_aliases_its_input() -> None:
    m = Shift2d(4, 3)  # fewer channels than taps: all in the centre group
    assert not list(m.parameters()) and not list(m.buffers()) and not m.state_dict()
    x = torch.randn(1, 4, 5, 5)
    y = m(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert repr(m) == ("Shift2d(4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
                       "dilation=(1, 1))")


def test_shift_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 11, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Shift2d(11, 3, 2), (x,))
    assert torch.autograd.gradcheck(Shift2d(11, (3, 5), 1, dilation=2), (x,))


def test_shift_refusals() -> None:
    with pytest.raises(AutobuildError, match="odd sides"):
        Shift2d(8, 2)
    with pytest.raises(AutobuildError, match=r"expected \(N, 8, H, W\)"):
        Shift2d(8, 3)(torch.randn(1, 4, 5, 5))
    with pytest.raises(AutobuildError, match="smaller than the kernel"):
        Shift2d(8, 5, padding=0)(torch.randn(1, 8, 3, 3))


# ---- converted networks: counts, training, refusals ------------------------------------------
def _expected_params(base: nn.Module, sites: list[str]) -> int:
    """The baseline minus each site's conv; a same-width site loses its BN too unless it
    ends a residual branch (conv2 of a basic block), a channel-changing one gains a
    bias-free 1x1 conv (its BN stays)."""
    modules = dict(base.named_modules())
    total = sum(p.numel() for p in base.parameters())
    for name in sites:
        conv = modules[name]
        total -= conv.weight.numel()
        if conv.in_channels == conv.out_channels:
            if not name.endswith("conv2"):
                bn = modules[name.replace("conv", "bn")]
                total -= bn.weight.numel() + bn.bias.numel()
        else:
            total += conv.in_channels * conv.out_channels
    return total


@pytest.mark.parametrize("model,size,n_sites", [("cifar_resnet20", (3, 32, 32), 18),
                                                ("resnet18", (3, 64, 64), 16)])
def test_resnets_convert_with_zero_macs_shifts(model: str, size: tuple[int, int, int],
                                               n_sites: int) -> None:
    torch.manual_seed(0)
    base = resolve_baseline(model, input_size=size)
    a = Analysis(base)
    p = a.select("parameter-free", None, SHIFT)
    assert len(p) == n_sites
    m = a.build(p)
    shifts = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, Shift2d)]
    assert len(shifts) == n_sites

    counted = autobuild.count(m, size)
    predicted = a.cost(p)
    assert (predicted.params, predicted.macs, predicted.flops) == (
        counted.params, counted.macs, counted.flops)
    assert counted.params == _expected_params(base.module, sorted(p))
    for name, _ in shifts:
        assert counted.of(name) == {"params": 0, "macs": 0, "flops": 0}, name
    # The MACs are the max-pool conversion's: neither pool nor shift multiplies anything.
    as_max = a.cost(a.select("parameter-free", None, {"pool": "max"}))
    assert (counted.params, counted.macs) == (as_max.params, as_max.macs)

    m.train()
    y = m(torch.randn(2, *size))
    y.square().mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in m.parameters())
    # A channel-changing site keeps the pools' layout: shift, then a 1x1 conv.
    layer = m.layer2[0].conv1
    assert isinstance(layer, ParameterFreeLayer) and isinstance(layer.pool, Shift2d)
    assert layer.conv is not None and layer.conv.kernel_size == (1, 1)
    assert layer.pool.stride == (2, 2) and isinstance(m.layer2[0].bn1, nn.BatchNorm2d)
    assert m.layer2[1].conv1.conv is None and isinstance(m.layer2[1].bn1, nn.Identity)


def test_hybrid_layout_shifts_the_stride_1_sites() -> None:
    a = Analysis(resolve_baseline("resnet18", input_size=(3, 64, 64), device="meta"))
    m = a.build(a.select("parameter-free", None, {"layout": "hybrid", "pool": "shift"}))
    assert isinstance(m.layer2[0].conv1.pool, nn.AvgPool2d)  # the strided conv stays
    assert isinstance(m.layer2[0].conv2.pool, Shift2d)


def test_even_kernel_site_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 2))
    a = Analysis(resolve_baseline(net, input_size=(3, 8, 8)))
    with pytest.raises(AutobuildError, match=r"site 2: pool=shift needs odd kernel sides"):
        a.check({"2": "parameter-free:pool=shift"})
    assert isinstance(a.build(Placement({"2": "parameter-free:pool=max"}))[2].pool,
                      nn.MaxPool2d)


def test_token_layer_shifts_the_grid_and_not_the_class_token() -> None:
    torch.manual_seed(0)
    layer = TokenPoolLayer(8, 24, pool="shift", prefix=1)
    assert isinstance(layer.pool, Shift2d) and layer.pool.channels == 24
    x = torch.randn(2, 17, 8)
    y = F.gelu(layer.qkv(x))
    grid = y[:, 1:].transpose(1, 2).reshape(2, 24, 4, 4)
    shifted = _reference(grid.double(), (3, 3), 1, (1, 1), 1).float()
    mixed = torch.cat([y[:, :1], shifted.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(layer(x), layer.proj(F.gelu(mixed)), rtol=0, atol=1e-6)


# ---- saving and the command line ---------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = autobuild.convert("cifar_resnet20", "parameter-free", options=SHIFT).eval()
    autobuild.save(model, tmp_path / "m")
    loaded = autobuild.load(tmp_path / "m").eval()
    assert isinstance(loaded.layer1[0].conv1.pool, Shift2d)
    assert autobuild.plan_of(loaded) == autobuild.plan_of(model)
    before = model.state_dict()
    after = loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autobuild", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_converts_and_refuses_an_even_kernel() -> None:
    ok = _cli("convert", "cifar_resnet20", "--to", "parameter-free", "--option", "pool=shift",
              "--json")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["options"]["pool"] == "shift" and len(result["sites"]) == 18
    pytest.importorskip("timm")  # vit_micro_cifar is timm's ViT; its patch conv is 8x8
    bad = _cli("convert", "vit_micro_cifar", "--to", "parameter-free", "--option", "pool=shift",
               "--sites", "patch_embed.proj")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "patch_embed.proj" in bad.stderr and "pool=shift needs odd kernel" in bad.stderr
