"""Parameters, MACs and FLOPs, per module and in total.

MACs count multiply-accumulates of convolutions, linear layers and matrix products, as
the papers do (taken from ``torch.utils.flop_counter``'s formulas, which give 2 FLOPs per
MAC). FLOPs add what that counter leaves out: elementwise products and sums, activations,
batch norm, pooling, norms and the like, one FLOP per output element (pooling: one per
window element; batch norm: two, a scale and a shift).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["Counts", "count"]

aten = torch.ops.aten

_ONE_PER_OUTPUT = {
    aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_,
    aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.sigmoid, aten.tanh,
    aten.silu, aten.silu_, aten.gelu, aten.hardswish, aten.hardswish_, aten.hardsigmoid,
    aten.hardsigmoid_, aten.leaky_relu, aten.leaky_relu_, aten.clamp, aten.clamp_,
    aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.pow, aten.sqrt, aten.rsqrt,
    aten.exp, aten.neg, aten.reciprocal, aten.abs, aten.maximum, aten.minimum, aten.where,
    aten.square,
    aten.addcmul, aten.addcmul_, aten.mish, aten.elu,
}
_TWO_PER_OUTPUT = {aten._native_batch_norm_legit_no_training, aten.native_batch_norm,
                   aten._native_batch_norm_legit, aten.native_layer_norm, aten.native_group_norm}
_PER_INPUT = {aten.mean, aten.sum, aten.linalg_vector_norm, aten._adaptive_avg_pool2d,
              aten._softmax, aten.amax, aten.norm}
_POOLS = {aten.max_pool2d_with_indices, aten.avg_pool2d, aten.max_pool2d}


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


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.macs: dict[str, int] = defaultdict(int)
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        macs = flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            macs = flops // 2
        elif packet in _ONE_PER_OUTPUT:
            flops = _numel(_first(out))
        elif packet in _TWO_PER_OUTPUT:
            flops = 2 * _numel(_first(out))
        elif packet in _PER_INPUT:
            flops = _numel(args[0])
        elif packet in _POOLS:
            k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
            k = list(k) if isinstance(k, (list, tuple)) else [k, k]
            area = k[0] * (k[1] if len(k) > 1 else k[0])
            flops = _numel(_first(out)) * area
        if flops:
            for name in ("", *self.stack):
                self.macs[name] += macs
                self.flops[name] += flops
        return out


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook must return None, or it would replace the output


@torch.no_grad()
def count(model: nn.Module, input_size: Sequence[int] | None = None, *,
          batch_size: int = 1) -> Counts:
    """Count ``model`` on one input of ``input_size`` (C, H, W) in eval mode.

    Per-module numbers are inclusive of submodules; a module called several times adds up.
    ``input_size`` defaults to the size recorded in the model's plan.
    """
    if input_size is None:
        plan = getattr(model, "_autobuild_plan", None)
        if plan is None or plan.input_size is None:
            raise ValueError("count() needs input_size for a model without a plan")
        input_size = plan.input_size
    counter = _Counter()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: counter.stack.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: _pop(counter.stack)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        param = next(iter(model.parameters()), None)
        x = torch.randn(batch_size, *input_size,
                        device=param.device if param is not None else "cpu")
        with counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_modules()}
    return Counts(params[""], counter.macs[""] // batch_size, counter.flops[""] // batch_size,
                  {k: v // batch_size for k, v in counter.macs.items()},
                  {k: v // batch_size for k, v in counter.flops.items()}, params)
