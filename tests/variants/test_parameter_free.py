"""The parameter-free family (SPEC 1.3) against PfLayer's blocks written out by hand and
against the paper's ResNet-50 counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import Baseline
from autobuild.variants.parameter_free import ParameterFreeLayer
from tests.conftest import convert_baseline, max_rel_diff


def _bn(m: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so that a dropped or misplaced BN shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


# ---- ResNet-50: the paper's counts --------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50() -> Baseline:
    return resolve_baseline("resnet50")


def _conv2_macs(strided_only: bool) -> int:
    """MACs of ResNet-50's bottleneck 3x3 convs at 224x224: res² · width² · 9 each."""
    total = 0
    for width, blocks, res in ((64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)):
        n = (1 if width > 64 else 0) if strided_only else blocks
        total += n * res * res * width * width * 9
    return total


def _conv2_params(strided_only: bool) -> int:
    """Weights of those convs plus their BNs."""
    total = 0
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        n = (1 if width > 64 else 0) if strided_only else blocks
        total += n * (width * width * 9 + 2 * width)
    return total


@pytest.mark.parametrize("layout,paper_params,paper_gmacs", [("max", 14.23e6, 2.2),
                                                              ("hybrid", 17.33e6, 2.6)])
def test_resnet50_counts_reproduce_pflayer(resnet50: Baseline, layout: str, paper_params: float,
                                           paper_gmacs: float) -> None:
    base = autobuild.count(resnet50.module, (3, 224, 224))
    assert abs(base.params - 25.56e6) <= 0.01 * 25.56e6 and round(base.macs / 1e9, 1) == 4.1
    conv = convert_baseline(resnet50, "parameter-free", options={"layout": layout})
    c = autobuild.count(conv.model, (3, 224, 224))
    # Exactly the baseline minus the bottleneck 3x3 convs (+BN) PfLayer removes...
    kept = layout == "hybrid"
    removed_params = _conv2_params(False) - (_conv2_params(True) if kept else 0)
    removed_macs = _conv2_macs(False) - (_conv2_macs(True) if kept else 0)
    assert c.params == base.params - removed_params
    assert c.macs == base.macs - removed_macs
    # ...which is the paper's table: params to 1%, MACs at its one-decimal precision.
    assert abs(c.params - paper_params) <= 0.01 * paper_params
    assert round(c.macs / 1e9, 1) == paper_gmacs
    sites = [s.name for s in conv.sites]
    assert len(sites) == 16 and all(s.endswith(".conv2") for s in sites)


# ---- bottlenecks: PfLayer's MaxBottleneck / EffBottleneck by hand ----------------------------
def _reference_bottleneck(conv: Bottleneck, base: Bottleneck, x: torch.Tensor,
                          layout: str) -> torch.Tensor:
    """PfLayer resnet_pf.py: reduction (1x1+BN+ReLU) -> conv_block -> expansion (1x1+BN)."""
    out = F.relu(_bn(conv.bn1, F.conv2d(x, conv.conv1.weight)))
    s = base.conv2.stride[0]
    if layout == "hybrid" and s == 2:
        w = conv.conv2.conv.weight
        assert torch.equal(w, base.conv2.weight)  # the strided conv keeps its weights
        out = F.relu(_bn(conv.bn2, F.conv2d(F.avg_pool2d(out, 2, 2), w, padding=1)))
    else:
        out = F.max_pool2d(out, 3, s, 1)  # no BN, no ReLU after the pool
    out = _bn(conv.bn3, F.conv2d(out, conv.conv3.weight))
    identity = x
    if conv.downsample is not None:
        ds_conv, ds_bn = conv.downsample
        identity = _bn(ds_bn, F.conv2d(x, ds_conv.weight, stride=ds_conv.stride))
    return F.relu(out + identity)


@pytest.mark.parametrize("layout", ["max", "hybrid"])
def test_bottleneck_network_matches_pflayer(layout: str) -> None:
    torch.manual_seed(0)
    net = ResNet(Bottleneck, [1, 2, 1, 1], num_classes=7)
    _randomize_bn(net)
    base = resolve_baseline(net, input_size=(3, 64, 64))
    m = convert_baseline(base, "parameter-free", options={"layout": layout}).model.eval()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for conv_blk, base_blk in zip(getattr(m, name), getattr(net, name), strict=True):
                h = _reference_bottleneck(conv_blk, base_blk, h, layout)
        ref = m.fc(torch.flatten(m.avgpool(h), 1))
        assert max_rel_diff(ref, m(x)) <= 1e-5
    assert isinstance(m.layer2[1].bn2, nn.Identity)
    assert isinstance(m.layer2[0].bn2, nn.Identity if layout == "max" else nn.BatchNorm2d)


# ---- basic blocks and VGG: the pool plus a 1x1 channel map ----------------------------------
def test_basic_block_matches_hand_written_reference() -> None:
    torch.manual_seed(0)
    base = resolve_baseline("cifar_resnet20")
    _randomize_bn(base.module)
    m = convert_baseline(base, "parameter-free").model.eval()
    blk = m.layer2[0]  # 16 -> 32 channels, stride 2, option-A shortcut
    assert blk.conv1.conv.kernel_size == (1, 1) and isinstance(blk.bn1, nn.BatchNorm2d)
    # conv2 ends the residual branch: its BN stays (the only normalisation before the add).
    assert blk.conv2.conv is None and isinstance(blk.bn2, nn.BatchNorm2d)
    x = torch.relu(torch.randn(2, 16, 16, 16))  # a block reads a ReLU output
    with torch.no_grad():
        out = F.relu(_bn(blk.bn1, F.conv2d(F.max_pool2d(x, 3, 2, 1), blk.conv1.conv.weight)))
        out = _bn(blk.bn2, F.max_pool2d(out, 3, 1, 1))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
        ref = F.relu(out + short)
        assert max_rel_diff(ref, blk(x)) <= 1e-6


def test_a_branch_of_pools_stays_normalised() -> None:
    """Every conv of cifar_resnet20 after the stem becomes a pool. Without the BN before each
    residual addition the branch is pool(ReLU(pool(x))) >= x, so activations at least double
    per block (2^9 over the 9 blocks; training then saw losses of 1e16); with it, freshly
    initialised, the features stay within a few times the stem's."""
    torch.manual_seed(0)
    m = autobuild.convert("cifar_resnet20", "parameter-free").train()
    feats = {}
    m.layer1.register_forward_hook(lambda mod, i, o: feats.setdefault("in", i[0]))
    m.layer3.register_forward_hook(lambda mod, i, o: feats.setdefault("out", o))
    m(torch.randn(64, 3, 32, 32))
    growth = feats["out"].abs().mean() / feats["in"].abs().mean()
    assert growth < 16, growth


def test_vgg_every_conv_but_the_stem() -> None:
    base = resolve_baseline("cifar_vgg11")
    conv = convert_baseline(base, "parameter-free")
    layers = [m for m in conv.model.modules() if isinstance(m, ParameterFreeLayer)]
    assert len(layers) == 7 and isinstance(conv.model.features[0], nn.Conv2d)
    # Channel-changing convs get a 1x1 map (and keep their BN); the others are pools only.
    assert [lay.conv is not None for lay in layers] == [True, True, False, True, False, False,
                                                        False]
    y = conv.model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    assert autobuild.count(conv.model, (3, 32, 32)).params < autobuild.count(
        base.module, (3, 32, 32)).params


def test_resnet18_hybrid_keeps_strided_convs() -> None:
    base = resolve_baseline("resnet18", input_size=(3, 64, 64))
    m = convert_baseline(base, "parameter-free", options={"layout": "hybrid"}).model
    assert isinstance(m.layer2[0].conv1.pool, nn.AvgPool2d) and m.layer2[0].conv1.conv.stride == (
        1, 1)
    assert isinstance(m.layer2[1].conv1.pool, nn.MaxPool2d)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_ssd300_backbone_converts_and_detector_runs() -> None:
    base = resolve_baseline("ssd300_vgg16", num_classes=3)
    conv = convert_baseline(base, "parameter-free", options={"layout": "hybrid"})
    assert conv.sites and all(s.name.startswith("backbone.") for s in conv.sites)
    m = conv.model.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 300, 300)])
    assert {"boxes", "scores", "labels"} <= set(out[0])


class _Dilated(nn.Module):
    """SSD's fc6 in small: a 3x3 conv at dilation 2, padding 2 ("same")."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("pool", ["max", "shift", "identity"])
def test_a_dilated_same_padded_conv_keeps_its_size(pool: str) -> None:
    """Every operation that takes a dilated site keeps the conv's output size, finite (the
    explicit -inf padding is the max-pool's alone), and costs what it is predicted to."""
    analysis = autobuild.analyze(_Dilated(), input_size=(3, 16, 16))
    placement = analysis.select("parameter-free", ["c"], {"pool": pool})
    m = analysis.build(placement).eval()
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        y = m.c(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert torch.isfinite(m(torch.randn(2, 3, 16, 16))).all()
        if pool == "identity":
            assert torch.equal(y, x)
    assert analysis.cost(placement).to_dict() == autobuild.count(m).to_dict()


class _Detector(nn.Module):
    """A model whose converted part is a submodule (like the detectors' 'backbone')."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resolve_baseline("cifar_resnet20").module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_bn_of_a_rooted_model_is_found() -> None:
    base = Baseline(_Detector(), "custom:_Detector", (3, 32, 32), root="backbone")
    # conv1 (conv2 ends the branch, so its BN would stay whatever the root).
    m = convert_baseline(base, "parameter-free", sites=["backbone.layer1.0.conv1"]).model
    assert isinstance(m.backbone.layer1[0].bn1, nn.Identity)
    assert isinstance(m.backbone.layer1[0].conv1, ParameterFreeLayer)


# ---- refusals ----------------------------------------------------------------------------
def test_refusals() -> None:
    base = resolve_baseline("cifar_resnet20")
    with pytest.raises(AutobuildError, match="preserve"):
        convert_baseline(base, "parameter-free", init="preserve")
    with pytest.raises(AutobuildError, match="layout"):
        convert_baseline(base, "parameter-free", options={"layout": "avg"})
    valid = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, padding=0),
                          nn.Conv2d(8, 8, 3, padding="same"))
    custom = resolve_baseline(valid, input_size=(3, 16, 16))
    with pytest.raises(AutobuildError, match="output size"):
        convert_baseline(custom, "parameter-free", sites=["1"], options={"layout": "hybrid"})
    with pytest.raises(AutobuildError, match="numeric padding"):
        convert_baseline(custom, "parameter-free", sites=["2"])
    assert convert_baseline(custom, "parameter-free", sites=["1"]).model(
        torch.randn(1, 3, 16, 16)).shape == (1, 8, 7, 7)
