"""The fused training ops of the multiplicative, parameter-free, pde-global and dirac layers
against the plain formulations they replace: outputs (bit-identical where the op runs the
same kernels), gradients, running statistics, float64 gradcheck, saved memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobuild.ops
from autobuild.ops.pool import max_pool2d
from autobuild.variants.dirac import DiracConv2d
from autobuild.variants.multiplicative import QLBlock
from autobuild.variants.parameter_free import ParameterFreeLayer, TokenPoolLayer
from autobuild.variants.pde_global import GlobalLayer
from tests.ops.helpers import close, randomise, run, saved_bytes


class PlainOps(nn.Module):
    """The same module run through plain autograd (autobuild.ops.plain_ops)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autobuild.ops.plain_ops():
            return self.inner(x)


def _compare(module: nn.Module, x: torch.Tensor, *, exact: bool, bufs_exact: bool = True,
             tol: float = 1e-5) -> None:
    ref = copy.deepcopy(module)
    out, gx, gp = run(module, x)
    ref_out, ref_gx, ref_gp = run(PlainOps(ref), x)
    assert torch.equal(out, ref_out) if exact else close(out, ref_out, tol)
    assert close(gx, ref_gx, tol)
    for a, b in zip(gp, ref_gp, strict=True):
        assert close(a, b, tol)
    for (name, a), b in zip(module.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b) if bufs_exact else torch.allclose(a, b, rtol=1e-5), name


def _gradcheck(module: nn.Module, shape: tuple[int, ...]) -> None:
    m = copy.deepcopy(module).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x), (x, *m.parameters()))


# ---- multiplicative -------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["default", "save"])
@pytest.mark.parametrize("inp,out,width,stride,hardball", [(8, 8, 16, 1, False),
                                                           (6, 12, 10, 2, True)])
def test_ql_block(inp: int, out: int, width: int, stride: int, hardball: bool,
                  memory: str) -> None:
    torch.manual_seed(0)
    block = randomise(QLBlock(inp, out, width, stride, hardball))
    block.memory = memory
    _compare(block, torch.randn(4, inp, 9, 9), exact=True)
    _gradcheck(block, (3, inp, 5, 5))


def test_ql_block_memory() -> None:
    """The fused default keeps less than plain autograd; memory=save keeps about x only."""
    torch.manual_seed(0)
    block = QLBlock(8, 8, 32, 1, False)
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    plain = saved_bytes(PlainOps(block), x)
    default = saved_bytes(block, x)
    block.memory = "save"
    save = saved_bytes(block, x)
    assert default < 0.75 * plain
    assert save < 0.2 * plain


# ---- parameter-free -------------------------------------------------------------------------
POOLS = [((3, 3), (1, 1), (1, 1), (1, 1), False), ((3, 3), (2, 2), (1, 1), (1, 1), False),
         ((2, 2), (2, 2), (0, 0), (1, 1), True), ((3, 2), (2, 1), (1, 0), (1, 1), True),
         ((3, 3), (1, 1), (0, 0), (2, 2), False)]


@pytest.mark.parametrize("k,s,p,d,ceil", POOLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_is_exact_with_ties(k, s, p, d, ceil, channels_last: bool) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    # ReLU'd and rounded: many equal maxima (zeros), where the index choice matters.
    x = torch.randn(2, 3, 11, 9).relu().round(decimals=1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(F.max_pool2d(x, k, s, p, d, ceil).shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = max_pool2d(xa, k, s, p, d, ceil)
    ref = F.max_pool2d(xb, k, s, p, d, ceil)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(xa.grad, xb.grad)
    with torch.no_grad():
        assert torch.equal(max_pool2d(x, k, s, p, d, ceil), ref)


def test_max_pool_keeps_two_bytes_per_output() -> None:
    x = torch.randn(4, 8, 16, 16).relu().requires_grad_()
    ours = saved_bytes(lambda t: max_pool2d(t, 3, 1, 1), x)
    plain = saved_bytes(lambda t: F.max_pool2d(t, 3, 1, 1), x)
    assert ours == x.numel() * 2  # int16 indices only
    assert plain == x.numel() * (4 + 8)  # the input and int64 indices
    xd = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, 2, 1), (xd,))


def test_parameter_free_layer() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 9, 9).relu()
    _compare(ParameterFreeLayer(nn.MaxPool2d(3, 1, 1)), x, exact=True)
    _compare(ParameterFreeLayer(nn.MaxPool2d(3, 2, 1), randomise(nn.Conv2d(6, 4, 1))), x,
             exact=True)
    _compare(ParameterFreeLayer(nn.MaxPool2d(3, 1, 0, 2), pad=(2, 2)), x, exact=True)
    # PfLayer's efficient layer in place of an attention: its grid max-pool is the fused op.
    tokens = torch.randn(2, 1 + 25, 6)
    _compare(TokenPoolLayer(6, 18, prefix=1), tokens, exact=True)


# ---- pde-global -----------------------------------------------------------------------------
@pytest.mark.parametrize("coeffs", ["dwconv", "constant", "constant_diffusivity"])
@pytest.mark.parametrize("steps", [1, 2])
def test_global_layer(coeffs: str, steps: int) -> None:
    torch.manual_seed(0)
    layer = randomise(GlobalLayer(4, steps, 0.2, coeffs))
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 4, 6, 7)
    # The scheme's sums are regrouped: equal to float precision, not bit for bit; the
    # coefficients' BN statistics are the native kernel's on the same input: identical.
    _compare(layer, x, exact=False, bufs_exact=False)
    run(PlainOps(ref), x)
    for name in ("u", "v", "diff_x", "diff_y"):
        a, b = getattr(layer, name), getattr(ref, name)
        if a is not None:
            assert torch.equal(a.bn.running_mean, b.bn.running_mean)
            assert torch.equal(a.bn.running_var, b.bn.running_var)
    _gradcheck(layer, (2, 4, 5, 6))


def test_global_layer_memory() -> None:
    torch.manual_seed(0)
    layer = GlobalLayer(8)
    x = torch.randn(4, 8, 12, 12).relu().requires_grad_()
    assert saved_bytes(layer, x) < 0.4 * saved_bytes(PlainOps(layer), x)


# ---- dirac ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,groups,bias", [(4, 6, 1, False), (6, 4, 2, True),
                                                  (4, 4, 4, False), (3, 8, 1, True)])
def test_dirac_conv(cin: int, cout: int, groups: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = DiracConv2d(cin, cout, 3, groups=groups, bias=bias)
    with torch.no_grad():
        layer.alpha.normal_()
        layer.beta.normal_()
    _compare(layer, torch.randn(2, cin, 6, 5), exact=False)
    _gradcheck(layer, (2, cin, 5, 5))
    with torch.no_grad():  # inference builds the weight without δ: same conv
        x = torch.randn(2, cin, 6, 5)
        ref = F.conv2d(x, layer.effective_weight(), layer.bias, 1, layer.padding,
                       layer.dilation, groups)
        assert close(layer(x), ref)


def test_dirac_conv_keeps_no_rebuilt_weight() -> None:
    layer = DiracConv2d(64, 64, 3)
    x = torch.randn(2, 64, 4, 4, requires_grad=True)
    weight_bytes = layer.weight.numel() * 4
    ours = saved_bytes(layer, x)
    plain = saved_bytes(PlainOps(layer), x)
    assert ours < x.numel() * 4 + weight_bytes + 4096  # x, W and per-channel vectors
    assert plain > ours + weight_bytes  # plain keeps the rebuilt weight and its parts


def test_every_fused_op_refuses_double_backward() -> None:
    torch.manual_seed(0)
    for module, shape in ((QLBlock(4, 4, 8), (2, 4, 5, 5)), (GlobalLayer(3), (2, 3, 5, 5)),
                          (DiracConv2d(3, 3), (2, 3, 5, 5)),
                          (ParameterFreeLayer(nn.MaxPool2d(3, 1, 1)), (2, 3, 5, 5))):
        x = torch.randn(shape, requires_grad=True)
        with pytest.raises(RuntimeError, match="do not support double backward"):
            torch.autograd.grad(module(x).square().sum(), x, create_graph=True)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, plain: bool
           ) -> tuple[float, torch.Tensor]:
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        if plain:
            with autobuild.ops.plain_ops():
                loss = F.cross_entropy(model(x).float(), y)
        else:
            loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return float(loss.detach()), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("family,options", [("quadratic", {"memory": "save"}),
                                            ("multiplicative", {}),
                                            ("multiplicative", {"memory": "save"}),
                                            ("parameter-free", {}), ("pde-global", {}),
                                            ("dirac", {})])
def test_bf16_autocast_and_channels_last_training_step(family: str, options: dict) -> None:
    """A bf16-autocast, channels_last training step through the fused ops: finite float32
    gradients, as close to the float32 gradients as plain autograd's under autocast."""
    import autobuild

    torch.manual_seed(0)
    model = autobuild.convert("cifar_resnet20", family, options=options)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(10, (4,))
    loss32, g32 = _grads(model, x, y, amp=False, plain=True)
    loss, g = _grads(model, x, y, amp=True, plain=False)
    plain_loss, plain_g = _grads(model, x, y, amp=True, plain=True)
    assert abs(loss - loss32) <= abs(plain_loss - loss32) + 0.02 * max(1.0, abs(loss32))
    ours, theirs = (float(F.cosine_similarity(t, g32, dim=0)) for t in (g, plain_g))
    assert ours > theirs - 0.01 and ours > 0.9, (ours, theirs)
