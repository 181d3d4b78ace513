"""The multiplicative family (QLNet, arXiv 2308.01621) against SPEC 1.2, written out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild
from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.variants.multiplicative import (
    Hardball,
    QLBlock,
    QLNet,
    check_symmetry,
    ql_width,
    symmetry_transform,
)
from tests.conftest import all_sites, max_rel_diff


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """BN statistics and affines away from their init, so BN3.gamma = 0 hides nothing."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.2
            m.running_mean = torch.randn(c, generator=g) * 0.2
            m.running_var = torch.rand(c, generator=g) + 0.5


def _blocks(model: nn.Module) -> dict[str, QLBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLBlock)}


# ---- hardball ---------------------------------------------------------------------------------
def test_hardball_projects_onto_the_ball_of_radius_sqrt_c() -> None:
    c = 16
    x = torch.randn(3, c, 5, 5) * torch.rand(3, 1, 5, 5) * 3  # pixels inside and outside
    y = Hardball()(x)
    norm = x.norm(dim=1, keepdim=True)
    r = math.sqrt(c)
    expected = torch.where(norm <= r, x, r * x / norm)
    assert (norm <= r).any() and (norm > r).any()
    torch.testing.assert_close(y, expected)
    assert float(y.norm(dim=1).max()) <= r * (1 + 1e-6)


def test_hardball_backward_at_a_zero_pixel_is_finite() -> None:
    x = torch.randn(2, 8, 3, 3)
    x[0, :, 1, 1] = 0.0  # a pixel whose channel vector is exactly zero
    x[1, :, 0, 0] = 1.0  # exactly on the sphere: norm = sqrt(8) = r
    x.requires_grad_(True)
    Hardball()(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    # Inside the ball hardball is the identity, so d/dx sum(y²) = 2x there (0 at 0).
    assert torch.equal(x.grad[0, :, 1, 1], torch.zeros(8))


def test_hardball_commutes_with_a_rotation_of_the_channels() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    x = torch.randn(2, 12, 4, 4, dtype=torch.float64) * 2
    rot = torch.einsum("oc,nchw->nohw", q, x)
    torch.testing.assert_close(Hardball()(rot), torch.einsum("oc,nchw->nohw", q, Hardball()(x)))


# ---- the QL block -----------------------------------------------------------------------------
def _reference_block(b: QLBlock, x: torch.Tensor) -> torch.Tensor:
    """SPEC 1.2 line by line, with F.* ops and the block's own weights."""
    def bn(t: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias,
                            b.training, 0.0, m.eps)

    w = b.width
    y = bn(F.conv2d(x, b.conv1.weight), b.bn1)
    y = y[:, :w] * y[:, w:]
    y = bn(F.conv2d(y, b.conv2.weight, stride=b.stride, padding=1, groups=w), b.bn2)
    y = bn(F.conv2d(y, b.conv3.weight), b.bn3)
    if b.inplanes != b.outplanes or b.stride != 1:
        conv, norm = b.skip[0], b.skip[1]
        skip = bn(F.conv2d(x, conv.weight, stride=b.stride), norm)
    else:
        skip = x
    out = skip + y
    if isinstance(b.hardball, Hardball):
        norm = out.norm(dim=1, keepdim=True)
        r = math.sqrt(out.shape[1])
        out = torch.where(norm <= r, out, r * out / norm)
    return out


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("inp,out,stride,hardball", [(8, 8, 1, False), (8, 16, 2, True),
                                                     (16, 8, 1, True)])
def test_ql_block_matches_the_formulas(train: bool, inp: int, out: int, stride: int,
                                       hardball: bool) -> None:
    torch.manual_seed(0)
    b = QLBlock(inp, out, width=12, stride=stride, hardball=hardball)
    _randomize_bn(b)
    b.train(train)
    x = torch.randn(2, inp, 9, 9) * 2
    with torch.no_grad():
        y, ref = b(x), _reference_block(b, x)
    assert y.shape == (2, out, (9 - 1) // stride + 1, (9 - 1) // stride + 1)
    assert max_rel_diff(ref, y) <= 1e-5


def test_ql_block_init_has_no_relu_and_starts_as_its_skip() -> None:
    b = QLBlock(8, 16, 32, 2, hardball=False)
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU)) for m in b.modules())
    assert torch.equal(b.bn3.weight, torch.zeros(16)) and b.has_skip_conv
    x = torch.randn(2, 8, 8, 8)
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), b.skip(x))
    # kaiming normal, fan_out, linear gain: std = 1/sqrt(out_channels · k²).
    big = QLBlock(256, 256, 512)
    assert abs(float(big.conv1.weight.detach().std()) * math.sqrt(1024) - 1) < 0.05


def test_width_rule() -> None:
    assert [ql_width(c) for c in (16, 64, 256, 512)] == [64, 256, 1024, 1024]
    assert ql_width(64, 1.0) == 64 and ql_width(64, 0.5) == 32


# ---- plain conversions ------------------------------------------------------------------------
def test_plain_cifar_resnet20_keeps_every_blocks_interface() -> None:
    base = resolve_baseline("cifar_resnet20")
    sites = {s.name: s for s in all_sites(base) if s.kind == "block"}
    m = autobuild.convert("cifar_resnet20", "multiplicative")
    blocks = _blocks(m)
    assert set(blocks) == set(sites) and len(blocks) == 9
    for name, b in blocks.items():
        s = sites[name]
        assert (b.inplanes, b.outplanes, b.stride) == (s.in_channels, s.out_channels, s.stride)
        # Skip conv exactly where the shape changes (option-A padding becomes conv + BN).
        assert b.has_skip_conv == (name in ("layer2.0", "layer3.0"))
        assert isinstance(b.hardball, Hardball) == (name in ("layer2.0", "layer3.0"))
    # width = QLNet's rule on min(input channels, narrowest inner conv).
    assert [blocks[n].width for n in ("layer1.0", "layer2.0", "layer2.1", "layer3.1")] == \
        [64, 64, 128, 256]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plain_resnet50_puts_hardball_where_the_paper_does() -> None:
    m = autobuild.convert("resnet50", "multiplicative", input_size=(3, 64, 64))
    blocks = _blocks(m)
    assert len(blocks) == 16
    skips = {n for n, b in blocks.items() if b.has_skip_conv}
    balls = {n for n, b in blocks.items() if isinstance(b.hardball, Hardball)}
    assert skips == {"layer1.0", "layer2.0", "layer3.0", "layer4.0"}
    assert balls == {"layer2.0", "layer3.0", "layer4.0"}  # first block of stages 2-4
    assert (blocks["layer3.1"].inplanes, blocks["layer3.1"].width) == (1024, 1024)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    m = autobuild.convert("resnet50", "multiplicative", input_size=(3, 64, 64),
                          options={"hardball": "skip", "expansion": "1"})
    blocks = _blocks(m)
    assert {n for n, b in blocks.items() if isinstance(b.hardball, Hardball)} == skips
    assert blocks["layer3.1"].width == 256


def test_plain_basic_block_resnet_gets_qlnet_blocks() -> None:
    """resnet34 has QLNet-10m's stages; its plain conversion has QLNet's blocks exactly."""
    plain = autobuild.convert("resnet34", "multiplicative", input_size=(3, 64, 64))
    qlnet = autobuild.convert("resnet34", "multiplicative", input_size=(3, 64, 64),
                              options={"layout": "qlnet"})
    assert isinstance(qlnet, QLNet)
    assert sum(p.numel() for p in plain.parameters()) == \
        sum(p.numel() for p in qlnet.parameters())


def test_resnet18_plain_forward_and_backward() -> None:
    m = autobuild.convert("resnet18", "multiplicative", input_size=(3, 64, 64))
    assert len(_blocks(m)) == 8
    y = m(torch.randn(2, 3, 64, 64))
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ---- layout=qlnet -----------------------------------------------------------------------------
def test_qlnet_layout_reproduces_qlnet_10m(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "resnet50", "--to", "multiplicative", "--option", "layout=qlnet",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["options"]["layout"] == "qlnet"
    # QLNet paper: qlnet-10m has 10.06M params and 2.42 GMACs at 224x224.
    assert abs(summary["params"]["after"] / 10.06e6 - 1) <= 0.03
    assert abs(summary["macs"]["after"] / 2.42e9 - 1) <= 0.03


def test_qlnet_layout_structure_and_num_classes() -> None:
    m = autobuild.convert("resnet50", "multiplicative", options={"layout": "qlnet"},
                          num_classes=10, input_size=(3, 64, 64))
    assert isinstance(m, QLNet) and m.fc.out_features == 10
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [m.layer1[0].width, m.layer2[0].width, m.layer2[1].width, m.layer4[0].width,
            m.layer4[1].width] == [256, 256, 512, 1024, 1024]
    blocks = _blocks(m)
    assert {n for n, b in blocks.items() if b.has_skip_conv} == {"layer2.0", "layer3.0",
                                                                  "layer4.0"}
    assert {n for n, b in blocks.items() if isinstance(b.hardball, Hardball)} == \
        {"layer2.0", "layer3.0", "layer4.0"}
    assert isinstance(m.hardball, Hardball) and isinstance(m.relu, nn.ReLU)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].skip[0].stride == (2, 2)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_qlnet_layout_refuses_non_torchvision_resnets() -> None:
    with pytest.raises(AutobuildError, match="torchvision ResNet"):
        autobuild.convert("cifar_resnet20", "multiplicative", options={"layout": "qlnet"})


def test_bad_input_is_refused_with_a_clear_message() -> None:
    with pytest.raises(AutobuildError, match="cifar_resnet20"):
        autobuild.convert("cifar_vgg16", "multiplicative")
    for bad in ("abc", "0", "-1"):
        with pytest.raises(AutobuildError, match="expansion"):
            autobuild.convert("cifar_resnet20", "multiplicative", options={"expansion": bad})
    with pytest.raises(AutobuildError, match="preserve"):
        autobuild.convert("cifar_resnet20", "multiplicative", init="preserve")
    with pytest.raises(AutobuildError, match="layout"):
        autobuild.convert("cifar_resnet20", "multiplicative", options={"layout": "wide"})


# ---- the continuous symmetry ------------------------------------------------------------------
def _features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return out[0]


@pytest.mark.parametrize("model,options,size,stages", [
    ("cifar_resnet20", {}, None, 2),                      # stage 1 reads the stem's ReLU
    ("resnet18", {"layout": "qlnet"}, (3, 64, 64), 3),
    # softball is a function of the norm too; shared kernels are folded per channel
    ("resnet18", {"layout": "qlnet", "ball": "soft", "dw_kernels": 8}, (3, 64, 64), 3),
])
def test_symmetry_leaves_the_output_unchanged(model: str, options: dict, size: tuple | None,
                                              stages: int) -> None:
    torch.manual_seed(0)
    m = autobuild.convert(model, "multiplicative", options=options, input_size=size)
    _randomize_bn(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = check_symmetry(m, seed=3)
    assert result["relative"] <= 1e-4 and result["stages"] == stages
    assert result["max_abs_output"] > 0.1
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # untouched
    # The rotation is real: the residual stream itself is changed, only its norm is kept.
    x = torch.randn(2, *(size or (3, 32, 32)))
    rotated = symmetry_transform(m, seed=3)
    f0, f1 = _features(m, "layer2", x), _features(rotated, "layer2", x)
    assert max_rel_diff(f0, f1) > 0.1
    torch.testing.assert_close(f0.norm(dim=1), f1.norm(dim=1), rtol=1e-4, atol=1e-4)


def test_symmetry_cli_on_a_saved_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    m = autobuild.convert("cifar_resnet20", "multiplicative")
    _randomize_bn(m)
    autobuild.save(m, str(tmp_path / "run"))
    assert main(["symmetry", str(tmp_path / "run"), "--check", "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["relative"] <= 1e-4 and result["stages"] == 2


def test_symmetry_needs_ql_blocks() -> None:
    with pytest.raises(AutobuildError, match="multiplicative"):
        check_symmetry(resolve_baseline("cifar_resnet20").module, input_size=(3, 32, 32))
    # QL blocks in no whole stage: nothing rotates, and the check said it passed (stages=0)
    some = autobuild.convert("cifar_resnet20", "multiplicative", sites=["layer2.0", "layer3.1"])
    with pytest.raises(AutobuildError, match="no stage's residual stream can be rotated"):
        check_symmetry(some)


def test_an_expansion_that_rounds_to_no_channels_is_refused_not_clamped() -> None:
    """Widths used to be clamped to 1 channel: expansion=1e-30 silently built the same
    network as 0.01 under another placement key."""
    with pytest.raises(AutobuildError, match=r"expansion=1e-30 gives its QL block no channels"
                                             r" .*narrowest width 16 rounds to 0"):
        autobuild.convert("cifar_resnet20", "multiplicative", options={"expansion": 1e-30})
    with pytest.raises(AutobuildError, match="K > 0.03125 gives 1"):
        autobuild.convert("cifar_resnet20", "multiplicative", sites="layer1.0",
                          options={"expansion": 0.03125})  # 0.5 rounds to 0
    model = autobuild.convert("cifar_resnet20", "multiplicative", sites="layer1.0",
                              options={"expansion": 0.0313})
    assert model.layer1[0].width == 1  # (conv1 makes the two factors of the product)
    with pytest.raises(AutobuildError, match="narrowest width 64"):
        autobuild.convert("resnet18", "multiplicative",
                          options={"layout": "qlnet", "expansion": 0.001})
    # Refused in new input only: a plan an earlier version saved with one still builds.
    built = autobuild.analyze("cifar_resnet20").build({"layer1.0": "multiplicative:expansion=0.02"})
    assert built.layer1[0].width == 1


def test_a_too_narrow_expansion_is_refused_in_every_new_input(tmp_path, capsys) -> None:
    """Placement files, placement= in the API and search spaces are new input too; the
    search used to train such a trial at 1 channel."""
    from autobuild.search.groups import resolve_groups
    from autobuild.search.space import load_space

    narrow = {"layer1.0": "multiplicative:expansion=0.02"}
    with pytest.raises(AutobuildError, match="site layer1.0: expansion=0.02 gives"):
        autobuild.convert("cifar_resnet20", placement=narrow)
    path = tmp_path / "placement.yaml"
    path.write_text("layer1.0: multiplicative:expansion=0.02\n")
    out = tmp_path / "out"
    assert main(["convert", "cifar_resnet20", "--placement", str(path),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expansion=0.02 gives its QL block no channels" in err[0]
    assert not out.exists()
    analysis = autobuild.analyze("cifar_resnet20")
    space = {"name": "narrow", "baseline": "cifar_resnet20", "data": "synthetic",
             "groups": [{"sites": "layer2.*", "choices": ["quadratic"]},
                        {"sites": "layer1.*", "choices": ["multiplicative:expansion=0.02"]}]}
    with pytest.raises(AutobuildError, match=r"groups.1.choices: multiplicative:expansion"
                                             r"=0.02: .*site layer1.0: .*no channels"):
        resolve_groups(load_space(space), analysis)
    space["groups"][1]["choices"] = ["multiplicative:expansion=0.05"]  # 0.8 -> 1 channel
    assert len(resolve_groups(load_space(space), analysis)) == 2
    # One choice per site: refused only where it fits nowhere, and never offered where it
    # gives no channels (16 x 0.02 rounds to 0, 64 x 0.02 to 1)
    space["groups"] = [{"sites": ["layer1.*", "layer3.*"], "per_site": True,
                        "choices": ["multiplicative:expansion=0.02"]}]
    (group,) = resolve_groups(load_space(space), analysis)
    assert group.excluded == {"multiplicative:expansion=0.02": {"layer1.0", "layer1.1",
                                                                "layer1.2"}}
    assert not group.offers("multiplicative:expansion=0.02", "layer1.0")
    assert group.offers("multiplicative:expansion=0.02", "layer3.0")
    # A study made before these checks continues as it was made.
    space["groups"] = [{"sites": "layer1.*", "choices": ["multiplicative:expansion=0.02"]}]
    assert resolve_groups(load_space(space), analysis, new=False)[0].excluded == {}
