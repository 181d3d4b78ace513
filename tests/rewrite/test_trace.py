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
