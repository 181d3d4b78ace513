"""QuadraLib's model zoo as presets, the site options that reproduce its conversions
(stem=convert, shortcuts=linear), and fan's output bias c."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autobuild.errors import AutobuildError
from autobuild.models import build_model, resolve_baseline
from autobuild.variants.quadratic import QuadraticConv2d, QuadraticLinear
from tests.conftest import convert_baseline

#: Parameters of QuadraLib's own model files (image_classification/models, num_classes=10),
#: counted by instantiating them on CPU; and the autobuild conversion of the first-order
#: skeleton that builds the same network.
ZOO: list[tuple[str, int, dict[str, Any], int]] = [
    ("resnet10", 226_842, {"shortcuts": "linear"}, 6),
    ("resnet14", 518_938, {"shortcuts": "linear"}, 12),
    ("vgg7", 12_304_330, {"stem": "convert"}, 7),
    ("vgg13", 44_182_986, {"stem": "convert"}, 13),
    ("mobilenet", 3_229_514, {"stem": "convert"}, 17),
]


@pytest.mark.parametrize("name,params,options,sites", ZOO, ids=[z[0] for z in ZOO])
def test_quadralib_zoo_counts_and_the_conversion_that_builds_it(
        name: str, params: int, options: dict, sites: int) -> None:
    with torch.device("meta"):
        q = build_model(f"q{name}")
    assert sum(p.numel() for p in q.parameters()) == params
    conv = convert_baseline(resolve_baseline(f"quadralib_{name}"), "quadratic", options=options)
    assert len(conv.plan.sites) == sites
    assert sum(p.numel() for p in conv.model.parameters()) == params
    # The same convs are quadratic in the preset and in the conversion.
    quad_preset = sorted(n for n, m in q.named_modules() if isinstance(m, QuadraticConv2d))
    quad_conv = sorted(n for n, m in conv.model.named_modules()
                       if isinstance(m, QuadraticConv2d))
    assert quad_preset == quad_conv


def test_zoo_presets_run() -> None:
    m = build_model("qresnet14", num_classes=100).train()
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 100)
    y.square().mean().backward()


def test_shortcuts_linear_refuses_a_named_shortcut_and_stem_keep_is_the_default() -> None:
    base = resolve_baseline("quadralib_resnet14")
    default = convert_baseline(base, "quadratic")
    assert "layer2.0.shortcut.0" in default.plan.sites and "conv1" not in default.plan.sites
    with pytest.raises(AutobuildError, match="projection shortcut and shortcuts=linear"):
        convert_baseline(base, "quadratic", sites=["layer2.0.shortcut.0"],
                         options={"shortcuts": "linear"})
    stem = convert_baseline(base, "quadratic", options={"stem": "convert"})
    assert "conv1" in stem.plan.sites
    # torchvision ResNets: the downsample convs are the projection shortcuts.
    r18 = resolve_baseline("resnet18", input_size=(3, 64, 64))
    plan = convert_baseline(r18, "quadratic", options={"shortcuts": "linear"}).plan
    assert len(plan.sites) == 16 and not any("downsample" in s for s in plan.sites)


def test_fan_keeps_the_output_bias_c() -> None:
    torch.manual_seed(0)
    conv = QuadraticConv2d("fan", 3, 4, 3, 1, 1)
    assert conv.bias_sq is not None and conv.bias_sq.shape == (4,)
    with torch.no_grad():
        conv.bias_sq.fill_(0.5)
        x = torch.randn(1, 3, 5, 5)
        off = conv(x)
        conv.bias_sq.zero_()
        assert torch.allclose(off - conv(x), torch.full_like(off, 0.5))
    lin = QuadraticLinear("fan", 6, 5)
    # (W_a, W_b, W_c) + (b_a, b_b) + c: 3·30 + 2·5 + 5.
    assert sum(p.numel() for p in lin.parameters()) == 3 * 30 + 2 * 5 + 5
