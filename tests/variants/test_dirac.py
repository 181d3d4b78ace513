"""dirac: DiracNets v2 (Zagoruyko & Komodakis, arXiv 1706.00388) — the Dirac conv against the
formula, the ResNet -> DiracNet rewrite and its parameter counts, and folding."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild
from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import record_of, trace
from autobuild.variants.dirac import DiracConv2d, dirac_delta, fold
from tests.conftest import convert_baseline, max_rel_diff


def _reference_dirac_conv(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
                          beta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖), written out filter by filter, with δ the
    identity on the first min(C_out, C_in) channels (a "same"-padded, stride-1 conv)."""
    o, i, kh, kw = w.shape
    kernel = torch.zeros_like(w)
    for out in range(o):
        kernel[out] = beta[out] * w[out] / w[out].pow(2).sum().sqrt()
        if out < i:
            kernel[out, out, kh // 2, kw // 2] += alpha[out]
    return F.conv2d(x, kernel, bias, padding=(kh // 2, kw // 2))


def _randomise(layer: DiracConv2d) -> None:
    with torch.no_grad():
        layer.weight.normal_()
        layer.alpha.uniform_(0.5, 1.5)
        layer.beta.uniform_(-1.0, 1.0)
        if layer.bias is not None:
            layer.bias.normal_()


@pytest.mark.parametrize("cin,cout,k,bias", [(6, 6, 3, False), (4, 8, 3, True),
                                             (8, 4, 1, False), (5, 5, 5, True)])
def test_dirac_conv_matches_the_formula(cin: int, cout: int, k: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = DiracConv2d(cin, cout, k, bias=bias)
    _randomise(layer)
    x = torch.randn(2, cin, 9, 7)
    expected = _reference_dirac_conv(x, layer.weight, layer.alpha, layer.beta, layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_init_is_identity_plus_small_normalised_filter() -> None:
    layer = DiracConv2d(4, 8, 3)
    assert layer.alpha.shape == layer.beta.shape == (8,)
    assert torch.all(layer.alpha == 1.0) and torch.allclose(layer.beta, torch.tensor(0.1))
    # Widening: δ is the identity for the first C_in outputs only (torch.nn.init.dirac_).
    delta = dirac_delta(8, 4, (3, 3))
    assert torch.equal(delta[:4, :, 1, 1], torch.eye(4))
    assert delta[4:].abs().sum() == 0 and delta.sum() == 4
    # With β = 0 the layer is the identity on those channels and 0 on the rest.
    with torch.no_grad():
        layer.beta.zero_()
    x = torch.randn(1, 4, 5, 5)
    y = layer(x)
    assert torch.equal(y[:, :4], x) and y[:, 4:].abs().sum() == 0
    # Grouped (here depthwise) convs get the identity of each group.
    depthwise = DiracConv2d(4, 4, 3, groups=4)
    with torch.no_grad():
        depthwise.beta.zero_()
    assert torch.equal(depthwise(x), x)


def test_gradients_reach_alpha_beta_and_w() -> None:
    torch.manual_seed(0)
    layer = DiracConv2d(2, 2, 3, bias=True).double()
    _randomise(layer)
    x = torch.randn(1, 2, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, w, a, b: F.conv2d(
        inp, torch.addcmul(b.view(-1, 1, 1, 1) * F.normalize(w.flatten(1)).view_as(w),
                           a.view(-1, 1, 1, 1), layer.delta), padding=1),
        (x, layer.weight, layer.alpha, layer.beta))
    layer(x).square().sum().backward()
    for p in (layer.weight, layer.alpha, layer.beta, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_alpha_beta_are_not_weight_decayed() -> None:
    model = nn.Sequential(DiracConv2d(3, 3, 3), nn.BatchNorm2d(3))
    groups = autobuild.param_groups(model, 5e-4)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    conv = model[0]
    assert id(conv.weight) in decayed
    assert id(conv.alpha) not in decayed and id(conv.beta) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("resnet18", 11.52e6), ("resnet34", 21.64e6)])
def test_diracnet_parameter_counts(name: str, expected: float) -> None:
    """Paper: DiracNet-18 11.52M, DiracNet-34 21.64M (ResNet-18/34 minus the projection
    shortcuts, plus per-channel α and β). Parameters do not depend on the input size, so
    the conversion traces at 64x64 to keep the test fast."""
    model = autobuild.convert(name, "dirac", input_size=(3, 64, 64))
    assert abs(_params(model) - expected) / expected < 0.01
    assert abs(autobuild.count(model, (3, 64, 64)).params - expected) / expected < 0.01
    assert not any("downsample" in n for n, _ in model.named_modules())


def test_resnet18_becomes_a_plain_dirac_chain() -> None:
    model = autobuild.convert("resnet18", "dirac", input_size=(3, 64, 64))
    gm = trace(model)
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert not adds, "skip connections must be gone"
    diracs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(diracs) == 16  # 8 basic blocks x 2 convs; stem and classifier stay plain
    pools = [m for n, m in model.named_modules() if n.endswith("_pool")]
    assert len(pools) == 3 and all(isinstance(p, nn.MaxPool2d) for p in pools)
    # Every Dirac conv is followed by its BN, and preceded by a ReLU (or a max-pool of one).
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), DiracConv2d):
            (user,) = node.users
            assert isinstance(gm.get_submodule(user.target), nn.BatchNorm2d)
            prev = gm.get_submodule(node.args[0].target)
            if isinstance(prev, nn.MaxPool2d):
                prev = gm.get_submodule(node.args[0].args[0].target)
            assert isinstance(prev, (nn.ReLU, nn.MaxPool2d)), node.target
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet50"])
def test_network_scope_on_other_resnets(name: str) -> None:
    size = (3, 32, 32) if name.startswith("cifar") else (3, 64, 64)
    base = resolve_baseline(name, input_size=size)
    converted = convert_baseline(base, "dirac")
    x = torch.randn(2, *size)
    y = converted.model(x)
    assert y.shape == base.module(x).shape and torch.isfinite(y).all()
    assert any(c.site == "network" for c in converted.changes)
    # The stages stay Sequentials: model.layer3[-1] (Grad-CAM's hook point) works; torch.fx
    # had made them plain Modules. The state_dict is what the graph uses, as before.
    stage = converted.model.layer3
    assert isinstance(stage, nn.Sequential) and stage[-1] is stage[len(stage) - 1]
    assert set(converted.model.state_dict()) == set(autobuild.build_plan(
        converted.plan, load_baseline_weights=False).state_dict())
    assert all(not isinstance(m, nn.Conv2d) or m.stride == (1, 1) or n == "conv1"
               for n, m in converted.model.named_modules())


def test_a_resnet_with_zero_initialised_residuals_becomes_a_dirac_net_that_learns() -> None:
    """A block's last BN starting at 0 (torchvision's zero_init_residual, timm's default
    zero_init_last) makes it the identity through its skip; without the skip it would zero
    the whole signal, and every gradient but the classifier bias's. Those scales start at 1."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=4, zero_init_residual=True)
    model = autobuild.convert(base, "dirac", input_size=(3, 32, 32))
    assert "8 zero-initialised BN scales set to 1" in record_of(model).changes[-1].note
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead
    # (a trained BN scale is never all zero: the scales of other BNs stay as they were)
    assert all(bn.weight.eq(1).all() for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


def test_convs_scope_preserves_and_skips_what_delta_cannot_be() -> None:
    base = resolve_baseline("resnet18", input_size=(3, 64, 64))
    converted = convert_baseline(base, "dirac", options={"scope": "convs"}, init="preserve")
    names = {c.site for c in converted.changes}
    assert "conv1" not in names  # the stem is not a default site
    assert not any("downsample" in n for n in names)  # 1x1 stride 2
    assert "layer2.0.conv1" not in names and "layer2.0.conv2" in names  # stride 2 / 1
    m = converted.model.eval()
    base.module.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_diff(base.module(x), m(x)) <= 1e-5


def test_refusals() -> None:
    with pytest.raises(AutobuildError, match="stride"):
        DiracConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(AutobuildError, match="even"):
        DiracConv2d.from_conv(nn.Conv2d(4, 4, 2, padding=1))
    with pytest.raises(AutobuildError, match="same"):
        DiracConv2d.from_conv(nn.Conv2d(4, 4, 3))
    with pytest.raises(AutobuildError, match="scope=convs"):
        autobuild.convert("cifar_vgg11", "dirac")
    with pytest.raises(AutobuildError, match="preserve"):
        autobuild.convert("cifar_resnet20", "dirac", init="preserve")


def _trained_like(model: nn.Module) -> nn.Module:
    """Random α, β, BN statistics and affine parameters, so folding is tested off init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DiracConv2d):
                _randomise(m)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("scope", ["network", "convs"])
def test_fold_is_exact(scope: str) -> None:
    model = _trained_like(autobuild.convert("cifar_resnet20", "dirac",
                                            options={"scope": scope}))
    folded = fold(model).eval()
    assert not any(isinstance(m, DiracConv2d) for m in folded.modules())
    assert any(isinstance(m, DiracConv2d) for m in model.modules())  # a new model
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # Every Dirac conv took its BN; left: the stem's, and with scope=convs those of the two
    # stride-2 convs, which stay plain.
    assert bns == {"network": 1, "convs": 3}[scope]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = max_rel_diff(model(x), folded(x))
    assert diff <= 1e-4, diff
    plan = autobuild.plan_of(folded)
    assert plan.conversions[0].options["folded"] is True
    assert autobuild.plan_of(model).conversions[0].options["folded"] is False


def test_fold_without_dirac_convs_raises() -> None:
    with pytest.raises(AutobuildError, match="no Dirac convs"):
        fold(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)))
    folded = fold(autobuild.convert("cifar_resnet20", "dirac"))
    with pytest.raises(AutobuildError, match="no Dirac convs"):
        fold(folded)


def test_fold_cli_round_trip(tmp_path, capsys) -> None:
    run, out = str(tmp_path / "run"), str(tmp_path / "folded")
    model = _trained_like(autobuild.convert("cifar_resnet20", "dirac"))
    autobuild.save(model, run)
    assert main(["fold", run, "--out", out, "--json"]) == 0
    assert '"max_abs_diff"' in capsys.readouterr().out
    loaded = autobuild.load(out).eval()  # plan (folded=true) + weights, loaded strictly
    assert not any(isinstance(m, DiracConv2d) for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_diff(model(x), loaded(x)) <= 1e-4
    assert main(["fold", out, "--out", str(tmp_path / "again")]) == 2


def test_a_network_of_other_convs_is_refused_not_silently_left() -> None:
    # QuadraLib's qresnet10 is a ResNet of quadratic convs: removing its skips would not
    # make a DiracNet, and the conversion used to report success having done only that.
    with pytest.raises(AutobuildError, match="QuadraticConv2d, not an nn.Conv2d"):
        autobuild.convert("qresnet10", "dirac")


def test_folding_a_dirac_preset_is_refused_rather_than_saved_unloadable() -> None:
    # The preset's Dirac convs belong to the baseline: its plan cannot say they are folded,
    # so a saved fold would rebuild unfolded and refuse its own weights.
    model = autobuild.analyze("cifar_diracnet16_1").build({})
    with pytest.raises(AutobuildError, match="Dirac conv of the baseline"):
        fold(model)
    converted = autobuild.convert("cifar_resnet20", "dirac")
    assert autobuild.plan_of(fold(converted)) is not None  # a converted network still folds


def test_param_groups_take_a_numpy_weight_decay() -> None:
    import numpy as np

    model = nn.Sequential(DiracConv2d(3, 3, 3), nn.BatchNorm2d(3))
    for decay in (np.float64(5e-4), np.float32(5e-4), np.int64(0)):
        groups = autobuild.param_groups(model, decay)
        assert type(groups[0]["weight_decay"]) is float
        assert groups[0]["weight_decay"] == float(decay)
    torch.optim.SGD(autobuild.param_groups(model, np.float32(5e-4)), lr=0.1)
