"""Shared helpers of the fused-op tests: the bytes autograd keeps, parameter copies."""

from __future__ import annotations

import copy

import torch
from torch import nn


def saved_bytes(fn, *args) -> int:  # noqa: ANN001
    """Bytes autograd keeps for backward while ``fn(*args)`` runs (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.float().sum().backward()
    return sum(storages.values())


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from N(0, 1) (so that no term is zero by initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(output, input grad, parameter grads) of one training step on a copy of x."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad if grad is not None else torch.ones_like(out))
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def twins(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    return module, copy.deepcopy(module)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))
