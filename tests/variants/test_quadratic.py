"""The quadratic family against the formulas of SPEC 1.1, written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.variants.quadratic import QUADRATIC_TYPES, QuadraticConv2d, QuadraticLinear
from tests.conftest import convert_baseline, max_rel_diff


def _reference_conv(q: QuadraticConv2d, x: torch.Tensor) -> torch.Tensor:
    """Each branch as its own conv, straight from the table in SPEC 1.1."""
    def conv(inp, w, b=None):
        return F.conv2d(inp, w, b, q.stride, q.padding, q.dilation, q.groups)

    def bias(i):
        return None if q.bias is None else q.branch_weight(i, q.bias)

    w = [q.branch_weight(i) for i in range(QUADRATIC_TYPES[q.qtype])]
    if q.qtype == "ours":
        c = q.out_channels
        y = [conv(x, w[i], bias(i)) for i in range(3)]
        bn_w, bn_b = [q.branch_weight(i, q.bn.weight) for i in range(3)], \
            [q.branch_weight(i, q.bn.bias) for i in range(3)]
        rm = [q.branch_weight(i, q.bn.running_mean) for i in range(3)]
        rv = [q.branch_weight(i, q.bn.running_var) for i in range(3)]
        bn = [F.batch_norm(y[i], rm[i].clone(), rv[i].clone(), bn_w[i], bn_b[i], q.training,
                           0.0, q.bn.eps) for i in range(3)]
        assert bn[0].shape[1] == c
        return bn[0] * bn[1] + bn[2]
    if q.qtype == "t2":
        return conv(x * x, w[0], bias(0))
    if q.qtype == "t3":
        return conv(x, w[0], bias(0)) ** 2
    if q.qtype == "t4":
        return conv(x, w[0], bias(0)) * conv(x, w[1], bias(1))
    if q.qtype == "fan":
        return (conv(x, w[0], bias(0)) * conv(x, w[1], bias(1))
                + conv(x * x, q.weight_sq, q.bias_sq))
    raise AssertionError(q.qtype)


def _reference_volterra(q: QuadraticConv2d, x: torch.Tensor) -> torch.Tensor:
    """p^T A_o p + W_b p + b for every output pixel, patches cut out by explicit slicing
    (channel-major within the patch, as conv weights are laid out)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = q.kernel_size, q.stride, q.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = torch.zeros(b, q.out_channels, ho, wo)
    wb = q.weight.reshape(q.out_channels, -1)
    for i in range(ho):
        for j in range(wo):
            p = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(b, -1)
            quad = torch.einsum("bd,ode,be->bo", p, q.quad, p)
            out[:, :, i, j] = quad + p @ wb.T + (q.bias if q.bias is not None else 0)
    return out


@pytest.mark.parametrize("qtype", ["ours", "t2", "t3", "t4", "fan"])
@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_conv_types_match_formulas(qtype: str, groups: int, stride: int, train: bool) -> None:
    torch.manual_seed(0)
    q = QuadraticConv2d(qtype, 4, 6, 3, stride, 1, groups=groups, bias=True)
    with torch.no_grad():
        for p in q.parameters():
            p.normal_()
    q.train(train)
    x = torch.randn(2, 4, 7, 7)
    expected = _reference_conv(q, x)
    assert torch.allclose(q(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 1)])
def test_volterra_matches_formula_with_stride(stride: int, padding: int) -> None:
    torch.manual_seed(0)
    q = QuadraticConv2d("volterra", 3, 4, 3, stride, padding, bias=True)
    with torch.no_grad():
        q.quad.normal_()
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(q(x), _reference_volterra(q, x), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("qtype", list(QUADRATIC_TYPES))
def test_linear_types(qtype: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    q = QuadraticLinear.from_linear(base, qtype)
    with torch.no_grad():
        for p in q.parameters():
            p.normal_()
    q.eval()
    x = torch.randn(4, 5)
    w = [q.branch_weight(i) for i in range(QUADRATIC_TYPES[qtype])]
    b = [q.branch_weight(i, q.bias) for i in range(QUADRATIC_TYPES[qtype])]
    lin = [F.linear(x, w[i], b[i]) for i in range(len(w))]
    if qtype == "ours":
        bn = [F.batch_norm(lin[i], q.branch_weight(i, q.bn.running_mean),
                           q.branch_weight(i, q.bn.running_var), q.branch_weight(i, q.bn.weight),
                           q.branch_weight(i, q.bn.bias), False, 0.0, q.bn.eps) for i in range(3)]
        expected = bn[0] * bn[1] + bn[2]
    elif qtype == "t2":
        expected = F.linear(x * x, w[0], b[0])
    elif qtype == "t3":
        expected = lin[0] ** 2
    elif qtype == "t4":
        expected = lin[0] * lin[1]
    elif qtype == "fan":
        expected = lin[0] * lin[1] + F.linear(x * x, q.weight_sq, q.bias_sq)
    else:
        expected = lin[0] + torch.einsum("bd,ode,be->bo", x, q.quad, x)
    assert torch.allclose(q(x), expected, atol=1e-4, rtol=1e-4)
    assert q(torch.randn(2, 7, 5)).shape == (2, 7, 3)  # leading dims are kept


class _ConvCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func._overloadpacket is torch.ops.aten.convolution:
            self.convs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("qtype,convs", [("ours", 1), ("t2", 1), ("t3", 1), ("t4", 1),
                                         ("fan", 2)])
def test_branches_share_one_conv(qtype: str, convs: int) -> None:
    q = QuadraticConv2d(qtype, 4, 8, 3, 1, 1)
    counter = _ConvCounter()
    with counter:
        q(torch.randn(1, 4, 5, 5))
    assert counter.convs == convs


@pytest.mark.parametrize("qtype", ["ours", "fan"])
def test_preserve_resnet50(qtype: str) -> None:
    torch.manual_seed(0)
    base = resolve_baseline("resnet50")
    m = convert_baseline(base, "quadratic", options={"type": qtype}, init="preserve").model
    x = torch.randn(2, 3, 224, 224)
    base.module.eval()
    m.eval()
    with torch.no_grad():
        assert max_rel_diff(base.module(x), m(x)) <= 1e-4


def test_preserve_volterra_small_model() -> None:
    torch.manual_seed(0)
    base = resolve_baseline("cifar_resnet20")
    m = convert_baseline(base, "quadratic", sites=["layer1.*"], options={"type": "volterra"},
                      init="preserve").model
    x = torch.randn(2, 3, 32, 32)
    base.module.eval()
    m.eval()
    with torch.no_grad():
        assert max_rel_diff(base.module(x), m(x)) <= 1e-4


@pytest.mark.parametrize("qtype", ["t2", "t3", "t4"])
def test_types_without_linear_term_refuse_preserve(qtype: str) -> None:
    with pytest.raises(AutobuildError, match="cannot preserve"):
        autobuild.convert("cifar_resnet20", "quadratic", options={"type": qtype},
                          init="preserve")


def test_volterra_refuses_oversized_sites_with_the_size() -> None:
    with pytest.raises(AutobuildError,
                       match=r"layer3.0.conv2: volterra would have 21,[\d,]+ parameters"):
        autobuild.convert("cifar_resnet20", "quadratic", options={"type": "volterra"},
                          sites=["layer3.0.conv2"])
    # By default volterra takes only the sites under the limit.
    m = autobuild.convert("cifar_resnet20", "quadratic", options={"type": "volterra"})
    sites = autobuild.plan_of(m).sites
    assert "layer1.0.conv1" in sites and "layer3.0.conv2" not in sites
    assert all(sum(p.numel() for p in m.get_submodule(s).parameters()) <= 8_000_000
               for s in sites)


def test_default_sites_skip_the_stem() -> None:
    sites = autobuild.plan_of(autobuild.convert("resnet18", "quadratic")).sites
    assert "conv1" not in sites and "fc" not in sites
    assert "layer1.0.conv1" in sites and "layer2.0.downsample.0" in sites
    assert len(sites) == 19


def test_cifar_vgg16_reference_counts() -> None:
    """QuadraLib: every conv of the 13-conv CIFAR VGG to `ours`: 44.18M params and 939.6M
    MACs, against 14.73M / 313.2M (±0.5%)."""
    base = autobuild.count(resolve_baseline("cifar_vgg16").module, (3, 32, 32))
    m = autobuild.convert("cifar_vgg16", "quadratic", sites=["features.*"])
    assert len(autobuild.plan_of(m).sites) == 13
    conv = autobuild.count(m, (3, 32, 32))
    assert base.params == pytest.approx(14.73e6, rel=5e-3)
    assert base.macs == pytest.approx(313.2e6, rel=5e-3)
    assert conv.params == pytest.approx(44.18e6, rel=5e-3)
    assert conv.macs == pytest.approx(939.6e6, rel=5e-3)
    assert conv.flops > 2 * conv.macs  # the products and BN are in the FLOPs


def test_torch_compile_traces_a_converted_model() -> None:
    m = autobuild.convert("cifar_resnet20", "quadratic")
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), m(x), atol=1e-5)
