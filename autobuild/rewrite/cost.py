"""Parameters, MACs and FLOPs: the one counter of the project.

MACs count multiply-accumulates of convolutions, linear layers and matrix products, as
the papers do (taken from ``torch.utils.flop_counter``'s formulas, which give 2 FLOPs per
MAC). FLOPs add what that counter leaves out: elementwise products and sums, activations,
batch norm, pooling, norms and the like, one FLOP per output element (pooling: one per
window element; batch norm: two, a scale and a shift).

Counting needs shapes, not values, so it runs on the meta device whenever the model allows
(nothing is computed or allocated); a model that builds real tensors inside ``forward`` is
counted on its own device instead, with the same result. A build whose predicted size is
absurd is refused before anything is allocated (:func:`size_limits`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from autobuild.errors import AutobuildError

__all__ = ["MAX_MACS", "MAX_PARAMS", "CostCounter", "Counts", "count_module", "human",
           "meta_twin", "param_count", "run_on_meta", "size_limits"]

aten = torch.ops.aten

_ONE_PER_OUTPUT = {
    aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_,
    aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.sigmoid, aten.tanh,
    aten.silu, aten.silu_, aten.gelu, aten.hardswish, aten.hardswish_, aten.hardsigmoid,
    aten.hardsigmoid_, aten.leaky_relu, aten.leaky_relu_, aten.clamp, aten.clamp_,
    aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.pow, aten.sqrt, aten.rsqrt,
    aten.exp, aten.neg, aten.reciprocal, aten.abs, aten.maximum, aten.minimum, aten.where,
    aten.square, aten.addcmul, aten.addcmul_, aten.mish, aten.elu,
}
_TWO_PER_OUTPUT = {aten._native_batch_norm_legit_no_training, aten.native_batch_norm,
                   aten._native_batch_norm_legit, aten.native_layer_norm, aten.native_group_norm}
_PER_INPUT = {aten.mean, aten.sum, aten.linalg_vector_norm, aten._adaptive_avg_pool2d,
              aten._softmax, aten.amax, aten.norm}
_POOLS = {aten.max_pool2d_with_indices, aten.avg_pool2d, aten.max_pool2d}


def param_count(module: nn.Module) -> int:
    """Parameters of ``module`` (each shared parameter once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class Counts:
    """Totals and per-module counts (keys are qualified module names, "" = total)."""

    params: int
    macs: int
    flops: int
    module_macs: dict[str, int] = field(default_factory=dict)
    module_flops: dict[str, int] = field(default_factory=dict)
    module_params: dict[str, int] = field(default_factory=dict)

    def of(self, name: str) -> dict[str, int]:
        return {"params": self.module_params.get(name, 0), "macs": self.module_macs.get(name, 0),
                "flops": self.module_flops.get(name, 0)}

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


def op_cost(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, int]:
    """(MACs, FLOPs) of one aten call."""
    packet = func._overloadpacket
    if packet in flop_registry:
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        return flops // 2, flops
    if packet in _ONE_PER_OUTPUT:
        return 0, _numel(_first(out))
    if packet in _TWO_PER_OUTPUT:
        return 0, 2 * _numel(_first(out))
    if packet in _PER_INPUT:
        return 0, _numel(args[0])
    if packet in _POOLS:
        k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        k = list(k) if isinstance(k, (list, tuple)) else [k, k]
        return 0, _numel(_first(out)) * k[0] * (k[1] if len(k) > 1 else k[0])
    return 0, 0


class CostCounter(TorchDispatchMode):
    """Attributes every aten op's MACs/FLOPs to the names on ``stack`` (and to "")."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.macs: dict[str, int] = defaultdict(int)
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        macs, flops = op_cost(func, args, kwargs, out)
        if flops:
            for name in ("", *self.stack):
                self.macs[name] += macs
                self.flops[name] += flops
        return out


def meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device, made
    without copying any data (deepcopy with every tensor pre-mapped to a meta one)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def run_on_meta(module: nn.Module, input_size: Sequence[int], fn: Callable[[nn.Module, Any], Any],
                batch_size: int = 1) -> Any:
    """``fn(twin, x)`` with ``twin`` = ``module`` on the meta device (or ``module`` itself,
    on its own device, when its forward cannot run on meta) and a matching input ``x``, in
    eval mode; a failure of the real run propagates."""
    dtype = next(iter(module.parameters()), torch.empty(0)).dtype
    if _device(module).type != "meta":
        try:
            twin = meta_twin(module)
            with _eval(twin):
                return fn(twin, torch.empty(batch_size, *input_size, device="meta", dtype=dtype))
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
            pass  # a CPU tensor made inside forward, or a data-dependent op: count for real
    with _eval(module), torch.no_grad():
        x = torch.randn(batch_size, *input_size, device=_device(module), dtype=dtype)
        return fn(module, x)


def count_module(module: nn.Module, input_size: Sequence[int], *, per_module: bool = True
                 ) -> Counts:
    """Count ``module`` on one input of ``input_size`` (C, H, W) in eval mode.

    Per-module numbers are inclusive of submodules; a module called several times adds up.
    """

    def measure(model: nn.Module, x: torch.Tensor) -> CostCounter:
        counter = CostCounter()
        handles = []
        if per_module:
            for name, m in model.named_modules():
                if name:
                    handles.append(m.register_forward_pre_hook(
                        lambda _m, _a, name=name: counter.stack.append(name)))
                    handles.append(m.register_forward_hook(
                        lambda _m, _a, _o: _pop(counter.stack)))
        try:
            with counter:
                model(x)
        finally:
            for h in handles:
                h.remove()
        return counter

    counter = run_on_meta(module, input_size, measure)
    params = ({name: param_count(m) for name, m in module.named_modules()} if per_module
              else {"": param_count(module)})
    return Counts(params[""], counter.macs[""], counter.flops[""], dict(counter.macs),
                  dict(counter.flops), params)


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook must return None, or it would replace the output


#: 4G parameters: 16 GB of float32 weights (3x the largest torchvision classifier, which
#: every family converts; ``expansion=1000000`` wanted 8G and 32 GB).
MAX_PARAMS = 4_000_000_000
#: 10T MACs per image: ~3x a quadratic ViT-H/14 at 518x518.
MAX_MACS = 10_000_000_000_000


def size_limits() -> tuple[int, int]:
    """(max params, max MACs per image) of a build: the defaults or the environment's."""
    limits = []
    for var, default in (("AUTOBUILD_MAX_PARAMS", MAX_PARAMS), ("AUTOBUILD_MAX_MACS", MAX_MACS)):
        text = os.environ.get(var, "").strip()
        try:
            value = int(float(text)) if text else default
        except ValueError:
            value = -1
        if value < 1:
            raise AutobuildError(f"{var}={text!r} must be a positive number (e.g. 8e9)")
        limits.append(value)
    return limits[0], limits[1]


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
