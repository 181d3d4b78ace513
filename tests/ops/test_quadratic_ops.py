"""Quadratic ``ours``: the fused default and the memory-saving backward (``memory=save``)
against the plain formulation (conv, one BN over the three branches, product; plain
autograd), in float64 gradcheck, for running statistics, memory, AMP and compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import autobuild
import autobuild.ops
from autobuild.variants.quadratic import QuadraticConv2d, QuadraticLinear
from tests.ops.helpers import close, randomise, run, saved_bytes


def plain(q: QuadraticConv2d | QuadraticLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as plain autograd computes it (what the fused ops replace)."""
    if isinstance(q, QuadraticConv2d):
        y = q.bn(F.conv2d(x, q.weight, q.bias, q.stride, q.padding, q.dilation, q.groups))
        return q._combine(y, None, 1)
    y = F.linear(x, q.weight, q.bias)
    y = q.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
    return q._combine(y, None, y.dim() - 1)


class Plain(nn.Module):
    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain(self.q, x)


LAYERS = [
    pytest.param(lambda: QuadraticConv2d("ours", 4, 6, 3, 1, 1), (3, 4, 7, 7), id="conv"),
    pytest.param(lambda: QuadraticConv2d("ours", 4, 6, 3, 2, 1, groups=2), (3, 4, 7, 7),
                 id="conv-groups2-stride2"),
    pytest.param(lambda: QuadraticConv2d("ours", 4, 6, (3, 1), 1, "same", bias=False),
                 (3, 4, 6, 5), id="conv-same"),
    pytest.param(lambda: QuadraticLinear("ours", 5, 3), (6, 5), id="linear"),
    pytest.param(lambda: QuadraticLinear("ours", 5, 3), (2, 4, 5), id="linear-3d"),
]


@pytest.mark.parametrize("memory", ["default", "save"])
@pytest.mark.parametrize("make,shape", LAYERS)
def test_matches_the_plain_formulation(make, shape, memory: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    q = randomise(make())
    ref = copy.deepcopy(q)
    q.memory = memory
    x = torch.randn(shape)
    g = torch.randn(plain(copy.deepcopy(ref), x).shape)
    out, gx, gp = run(q, x, g)
    ref_out, ref_gx, ref_gp = run(Plain(ref), x, g)
    # Same kernels forward: bit-identical outputs and running statistics (one update).
    assert torch.equal(out, ref_out)
    for a, b in zip(q.buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b)
    assert int(q.bn.num_batches_tracked) == 1
    assert close(gx, ref_gx)
    for a, b in zip(gp, ref_gp, strict=True):
        assert close(a, b)


@pytest.mark.parametrize("memory", ["default", "save"])
@pytest.mark.parametrize("make,shape", LAYERS)
def test_gradcheck_float64(make, shape, memory: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    q = randomise(make()).double()
    q.memory = memory
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: q(x), (x, *q.parameters()))


def test_save_and_default_give_the_same_step() -> None:
    """One training step in each mode: outputs, gradients and running statistics agree."""
    torch.manual_seed(0)
    a = randomise(QuadraticConv2d("ours", 8, 8, 3, 1, 1))
    b = copy.deepcopy(a)
    b.memory = "save"
    x = torch.randn(4, 8, 9, 9)
    out_a, gx_a, gp_a = run(a, x)
    out_b, gx_b, gp_b = run(b, x)
    assert torch.equal(out_a, out_b)
    assert close(gx_a, gx_b)
    assert all(close(p, q) for p, q in zip(gp_a, gp_b, strict=True))
    for name, buf in a.bn.named_buffers():
        assert torch.equal(buf, b.bn.get_buffer(name)), name


def test_save_updates_running_statistics_once_where_checkpoint_updates_twice() -> None:
    torch.manual_seed(0)
    q = randomise(QuadraticConv2d("ours", 4, 4, 3, 1, 1))
    ckpt = copy.deepcopy(q)
    q.memory = "save"
    once = copy.deepcopy(q)
    x = torch.randn(4, 4, 8, 8)
    run(q, x)
    with torch.no_grad():  # one plain update, for reference
        plain(once, x)
    assert torch.equal(q.bn.running_mean, once.bn.running_mean)
    assert torch.equal(q.bn.running_var, once.bn.running_var)
    assert int(q.bn.num_batches_tracked) == 1
    xc = x.clone().requires_grad_()
    checkpoint(lambda t: plain(ckpt, t), xc, use_reentrant=False).sum().backward()
    assert int(ckpt.bn.num_batches_tracked) == 2  # what memory=save avoids


def test_momentum_none_and_eval_mode() -> None:
    torch.manual_seed(0)
    q = randomise(QuadraticConv2d("ours", 4, 4, 3, 1, 1))
    q.bn.momentum = None  # cumulative moving average
    ref = copy.deepcopy(q)
    q.memory = "save"
    for _ in range(3):
        x = torch.randn(4, 4, 6, 6)
        run(q, x)
        run(Plain(ref), x)
    assert torch.allclose(q.bn.running_var, ref.bn.running_var, rtol=1e-6)
    assert torch.equal(q.bn.num_batches_tracked, ref.bn.num_batches_tracked)
    q.eval()
    ref.eval()
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(q(x), plain(ref, x))  # eval: the plain path, running statistics


def test_memory_save_keeps_a_quarter_of_quadralib() -> None:
    """Saved-for-backward bytes: memory=save <= 0.25x QuadraLib's three convs + three BNs;
    the fused default keeps less than the plain formulation."""
    torch.manual_seed(0)
    c = 16
    x = torch.randn(8, c, 16, 16, requires_grad=True)
    convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(3))
    bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))

    def quadralib(t: torch.Tensor) -> torch.Tensor:
        a, b, cc = (bn(conv(t)) for conv, bn in zip(convs, bns, strict=True))
        return a * b + cc

    q = QuadraticConv2d("ours", c, c, 3, 1, 1, bias=False)
    reference = saved_bytes(quadralib, x)
    default = saved_bytes(q, x)
    plain_bytes = saved_bytes(lambda t: plain(q, t), x)
    q.memory = "save"
    save = saved_bytes(q, x)
    assert save <= 0.25 * reference
    assert default < plain_bytes


def test_double_backward_is_refused_clearly() -> None:
    q = QuadraticConv2d("ours", 2, 2, 3, 1, 1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    for memory in ("default", "save"):
        q.memory = memory
        with pytest.raises(RuntimeError, match="do not support double backward"):
            torch.autograd.grad(q(x).sum(), x, create_graph=True)
    with autobuild.ops.plain_ops():  # the escape hatch: plain autograd, double backward
        (g,) = torch.autograd.grad(q(x).sum(), x, create_graph=True)
        g.square().sum().backward()


@pytest.mark.parametrize("memory", ["default", "save"])
def test_bf16_autocast_and_channels_last(memory: str) -> None:
    torch.manual_seed(0)
    q = randomise(QuadraticConv2d("ours", 8, 8, 3, 1, 1))
    ref = copy.deepcopy(q)
    q.memory = memory
    x = torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gp = run(q, x)
        ref_out, ref_gx, _ = run(Plain(ref), x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref_out.float(), atol=0.1, rtol=0.05)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()
    assert torch.allclose(gx, ref_gx, atol=0.1 * float(ref_gx.abs().max()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gp)


def test_memory_option_through_convert_and_save(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    saving = autobuild.convert("cifar_resnet20", "quadratic", options={"memory": "save"})
    default = autobuild.convert("cifar_resnet20", "quadratic")
    layers = [m for m in saving.modules() if isinstance(m, QuadraticConv2d)]
    assert layers and all(m.memory == "save" for m in layers)
    assert "memory=save" in repr(layers[0])
    assert {k: v.shape for k, v in saving.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()}
    autobuild.save(saving, tmp_path / "run")
    loaded = autobuild.load(tmp_path / "run")
    assert all(m.memory == "save" for m in loaded.modules() if isinstance(m, QuadraticConv2d))
    x = torch.randn(2, 3, 32, 32)
    saving.train()
    out = saving(x)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in saving.parameters())
