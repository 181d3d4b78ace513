"""Tracing: leaf modules, and errors that name the failing op and the remedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autobuild
from autobuild.errors import AutobuildError


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv(x)
        return -self.conv(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.head(self.gate(x))


def test_untraceable_model_names_module_line_and_fix() -> None:
    with pytest.raises(AutobuildError) as info:
        autobuild.convert(Net(), "quadratic", input_size=(3, 8, 8))
    msg = str(info.value)
    assert "'gate' (Gate)" in msg and "if x.mean() > 0" in msg and "leaf_modules" in msg
    assert "\n" not in msg


def test_leaf_modules_make_it_convertible_and_loadable(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    m = autobuild.convert(net, "quadratic", input_size=(3, 8, 8), leaf_modules=["gate"],
                          sites=["head"], init="preserve")
    assert autobuild.plan_of(m).leaf_modules == ["gate"]
    autobuild.save(m, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"), baseline=Net())
    x = torch.randn(1, 3, 8, 8)
    m.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
        assert torch.allclose(m(x), net.eval()(x), atol=1e-6)
    # A misspelt name would keep nothing opaque: it is refused, with the names there are.
    with pytest.raises(AutobuildError, match=r"unknown leaf module 'gaet' \(did you mean gate"):
        autobuild.convert(net, "quadratic", input_size=(3, 8, 8), leaf_modules=["gaet"])
    autobuild.analyze(net, input_size=(3, 8, 8), leaf_modules=["Gate"])  # a class name


class NormAct(nn.BatchNorm2d):
    """A norm fx traces through (not torch.nn's own class), as timm's BatchNormAct2d."""

    def forward(self, x):
        # (as timm's: without running statistics, batch statistics in eval too)
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, momentum=0.1,
                                     training=self.training or self.running_mean is None)
        return nn.functional.relu(x)


class Head(nn.Module):
    """Dropout written with the module's flag, as timm's classifier heads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(nn.functional.dropout(x.mean((2, 3)), 0.5, self.training))


class Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = NormAct(4)
        self.head = Head()

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


def test_a_norm_without_running_statistics_keeps_batch_statistics_in_eval() -> None:
    from autobuild.rewrite.trace import trace

    net = Traced()
    net.norm = NormAct(4, track_running_stats=False)
    gm = trace(net).eval()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_a_traced_graph_follows_train_and_eval_as_the_module_does(traced_in) -> None:
    """fx evaluates ``self.training`` while tracing; the flag passed to F.batch_norm and
    F.dropout is the module's at run time, whatever the mode the graph was traced in."""
    from autobuild.rewrite.trace import trace

    torch.manual_seed(0)
    net = Traced()
    net.norm.running_mean.normal_()
    getattr(net, traced_in)()
    gm = trace(net)
    x = torch.randn(8, 3, 6, 6)
    for mode in ("eval", "train"):
        for m in (net, gm):
            getattr(m, mode)()
        with torch.no_grad():
            torch.manual_seed(1)
            expected = net(x)
            torch.manual_seed(1)
            assert torch.equal(gm(x), expected), mode
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))  # no dropout, no batch statistics in eval


def test_a_graph_edited_conversion_keeps_dropout_off_in_eval() -> None:
    """DiracNet's conversion edits the traced graph of the root; the converted timm ResNet's
    head dropout must still follow eval() (it ran in eval too, until the flag was live)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = autobuild.convert("timm:resnet18", "dirac", sites="network", num_classes=4,
                          input_size=(3, 32, 32),
                          model_args={"drop_rate": 0.5, "drop_path_rate": 0.5})
    # (timm's drop path decides in Python whether to drop: it stays a module)
    assert sum(type(m).__name__ == "DropPath" for m in m.modules()) == 7
    assert isinstance(m, torch.fx.GraphModule)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m(x))
        assert not torch.equal(m.train()(x), m(x))


def test_a_baseline_with_norms_traced_through_is_analysed_at_batch_one_on_1x1_maps() -> None:
    """The analysis runs one image in eval mode: a norm traced through no longer asks for
    batch statistics of a single value (timm's EfficientNet at 32x32 reaches 1x1)."""
    pytest.importorskip("timm")
    analysis = autobuild.analyze("timm:test_efficientnet", input_size=(3, 32, 32))
    assert analysis.counts.params > 0


@pytest.mark.parametrize("family", [v.name for v in autobuild.variants.list_variants()])
def test_other_tracers_trace_a_converted_model_given_the_leaf_modules(family: str) -> None:
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    torch.manual_seed(0)
    m = autobuild.convert("cifar_resnet20", to=family).eval()
    leaves = {"leaf_modules": autobuild.leaf_modules()}
    last = get_graph_node_names(m, tracer_kwargs=leaves)[1][-1]
    features = create_feature_extractor(m, {last: "out"}, tracer_kwargs=leaves).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(features(x)["out"], m(x))
