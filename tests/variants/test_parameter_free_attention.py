"""parameter-free on attention sites (PfLayer's ViT-S-max / PiT-S-max) and the other
parameter-free operations of its layer study (avg-pool, identity).

Reference counts come from naver-ai/PfLayer's own ``vit_pf.py`` / ``pit_pf.py`` (commit in
the mirror of github:naver-ai/PfLayer), instantiated with timm 1.0 and counted with
autobuild's counter at 224x224 (einops replaced by transposes/reshapes for the three patterns
the files use): vit_ti_max 6,159,400 / 1,244,757,504 MACs; vit_s_max 23,819,368 /
4,743,822,336; vit_b_max 93,644,008 / 18,504,873,984; pit_ti_max 5,174,504 / 631,512,960;
pit_s_max 25,119,784 / 2,813,372,640; pit_b_max 79,005,928 / 12,428,636,160.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import Analysis, Baseline, Placement, register_attention
from autobuild.variants._pf_layers import TokenPoolLayer

pytest.importorskip("timm")


def _default_placement(a: Analysis) -> Placement:
    return a.select("parameter-free")


# ---- counts against PfLayer's code ---------------------------------------------------------
@pytest.mark.parametrize("size,params,macs", [
    ("ti", 6_159_400, 1_244_757_504),
    ("s", 23_819_368, 4_743_822_336),
])
def test_vit_max_counts_equal_pflayer(size: str, params: int, macs: int) -> None:
    a = Analysis(resolve_baseline(f"pflayer_vit_{size}", device="meta"))
    p = _default_placement(a)
    # PfLayer alternates: attention in the even blocks, its efficient layer in the odd ones.
    assert sorted(p, key=lambda n: int(n.split(".")[1])) == [
        f"blocks.{i}.attn" for i in (1, 3, 5, 7, 9, 11)]
    got = a.cost(p)
    assert (got.params, got.macs) == (params, macs)


def test_pit_s_max_counts_equal_pflayer() -> None:
    a = Analysis(resolve_baseline("pflayer_pit_s", device="meta"))
    p = _default_placement(a)
    # PfLayer alternates within each stage: blocks 1 | 1, 3, 5 | 1, 3 take the efficient layer.
    assert sorted(p) == sorted(
        ["transformers.0.blocks.1.attn"] + [f"transformers.1.blocks.{i}.attn" for i in (1, 3, 5)]
        + [f"transformers.2.blocks.{i}.attn" for i in (1, 3)])
    got = a.cost(p)
    assert (got.params, got.macs) == (25_119_784, 2_813_372_640)


def test_timm_pit_s_differs_from_pit_s_max_by_its_class_token_path_only() -> None:
    """timm's PiT-S keeps a class token (144 params) that each pooling layer maps with a
    Linear (144->288, 288->576: 41,760 + 166,464); PfLayer's PiT-S-max has none."""
    a = Analysis(resolve_baseline("timm:pit_s_224", device="meta"))
    p = _default_placement(a)
    assert sorted(p) == sorted(
        ["transformers.0.blocks.1.attn"] + [f"transformers.1.blocks.{i}.attn" for i in (1, 3, 5)]
        + [f"transformers.2.blocks.{i}.attn" for i in (1, 3)])
    assert a.cost(p).params == 25_119_784 + 144 + 41_760 + 166_464


# ---- numerics against PfLayer's EffLayer written out -------------------------------------
def _eff_layer(x: torch.Tensor, layer: TokenPoolLayer, pool) -> torch.Tensor:
    """vit_pf.EffLayer.forward: qkv -> GELU -> (b (h w) c -> b c h w) -> pool -> back ->
    GELU -> proj, on a token sequence without prefix tokens."""
    b, n, _ = x.shape
    side = int(n ** 0.5)
    y = F.gelu(F.linear(x, layer.qkv.weight, layer.qkv.bias))
    y = pool(y.transpose(1, 2).reshape(b, -1, side, side)).flatten(2).transpose(1, 2)
    return F.linear(F.gelu(y), layer.proj.weight, layer.proj.bias)


@pytest.mark.parametrize("op,pool", [
    ("max", lambda g: F.max_pool2d(g, 3, 1, 1)),
    ("avg", lambda g: F.avg_pool2d(g, 3, 1, 1, count_include_pad=False)),
    ("identity", lambda g: g),
])
def test_token_layer_matches_pflayer_efflayer(op: str, pool) -> None:
    torch.manual_seed(0)
    layer = TokenPoolLayer(8, 24, pool=op, prefix=0)
    x = torch.randn(2, 25, 8)
    torch.testing.assert_close(layer(x), _eff_layer(x, layer, pool), rtol=0, atol=1e-6)
    # A class token in front: the grid is unchanged, the token gets the token-wise MLP.
    prefixed = TokenPoolLayer(8, 24, pool=op, prefix=1)
    prefixed.load_state_dict(layer.state_dict())
    cls = torch.randn(2, 1, 8)
    out = prefixed(torch.cat([cls, x], 1))
    torch.testing.assert_close(out[:, 1:], layer(x), rtol=0, atol=1e-6)
    mlp = prefixed.proj(F.gelu(F.gelu(prefixed.qkv(cls))))
    torch.testing.assert_close(out[:, :1], mlp, rtol=0, atol=1e-6)


def test_converted_micro_vit_trains_and_keeps_pflayer_names() -> None:
    torch.manual_seed(0)
    m = autobuild.convert("vit_micro_cifar", "parameter-free")
    assert list(autobuild.plan_of(m).placement) == ["blocks.1.attn"]
    layer = m.blocks[1].attn
    assert isinstance(layer, TokenPoolLayer) and layer.prefix == 1  # the class token
    assert {k.split(".")[-2] for k in layer.state_dict()} == {"qkv", "proj"}
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert layer.qkv.weight.grad is not None and torch.isfinite(layer.qkv.weight.grad).all()


# ---- the attention site kind -----------------------------------------------------------
def test_attention_sites_are_found_by_structure_and_by_a_registered_predicate() -> None:
    a = Analysis(resolve_baseline("vit_micro_cifar", device="meta"))
    sites = {s.name: s for s in a.sites() if s.kind == "attention"}
    assert sorted(sites) == ["blocks.0.attn", "blocks.1.attn"]
    s = sites["blocks.0.attn"]
    assert s.input_shape == (17, 48) and s.output_shape == (17, 48) and s.extra["tokens"] == 17
    assert s.params == 48 * 144 + 144 + 48 * 48 + 48

    class OpaqueMixer(nn.Module):  # a leaf: the tracer does not see its softmax
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = OpaqueMixer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mix(x)

    def base() -> Baseline:
        return Baseline(Net(), "net", (5, 4), leaf_modules=(OpaqueMixer,))

    assert not [s for s in Analysis(base()).sites() if s.kind == "attention"]
    register_attention(lambda m: isinstance(m, OpaqueMixer))
    try:
        found = [s for s in Analysis(base()).sites() if s.kind == "attention"]
    finally:
        from autobuild.rewrite import sites as sites_module
        sites_module._ATTENTION_PREDICATES.pop()
    assert [s.name for s in found] == ["mix"]


def test_attention_refusals() -> None:
    a = Analysis(resolve_baseline("vit_micro_cifar", device="meta"))
    with pytest.raises(AutobuildError, match="kernel=4 must be odd"):
        a.check({"blocks.1.attn": "parameter-free:kernel=4"})
    with pytest.raises(AutobuildError, match="not form a square grid"):
        a.check({"blocks.1.attn": "parameter-free:prefix_tokens=2"})
    with pytest.raises(AutobuildError, match="cannot apply an attention mask"):
        TokenPoolLayer(4, 8)(torch.randn(1, 4, 4), attn_mask=torch.ones(4, 4))


# ---- the layer study's operations on conv sites ------------------------------------------
def test_avg_and_identity_on_a_bottleneck() -> None:
    a = Analysis(resolve_baseline("resnet50", device="meta"))
    avg = a.build(Placement({"layer1.0.conv2": "parameter-free:pool=avg"}))
    pool = avg.layer1[0].conv2.pool
    assert isinstance(pool, nn.AvgPool2d) and not pool.count_include_pad
    assert isinstance(avg.layer1[0].bn2, nn.Identity)
    ident = a.build(Placement({"layer1.0.conv2": "parameter-free:pool=identity"}))
    assert isinstance(ident.layer1[0].conv2.pool, nn.Identity)
    with pytest.raises(AutobuildError, match="pool=identity cannot down-sample"):
        a.check({"layer2.0.conv2": "parameter-free:pool=identity"})


def test_cli_lists_attention_sites_for_every_family(capsys) -> None:
    import json

    from autobuild.cli import main

    assert main(["sites", "vit_micro_cifar", "--to", "all", "--json"]) == 0
    sites = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert sites["blocks.0.attn"]["kind"] == "attention"
    assert sites["blocks.0.attn"]["families"] == ["parameter-free"]
    assert sites["blocks.0.attn"]["default_for"] == []        # PfLayer keeps even blocks
    assert sites["blocks.1.attn"]["default_for"] == ["parameter-free"]


def test_no_default_site_says_which_option_left_the_attentions_out() -> None:
    with pytest.raises(AutobuildError, match=r"attn is left out because kernel=4 must be odd"):
        autobuild.convert("vit_micro_cifar", "parameter-free", options={"kernel": 4})
