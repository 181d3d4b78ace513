"""What a conversion changed: counts before/after, per converted site, and how far the
converted model's output is from the baseline's (the numbers ``convert``/``inspect`` print)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flat_output", "output_difference", "summarize"]


def flat_output(y: Any) -> Tensor:
    """A model output (tensor, tuple/list or dict of tensors) as one flat tensor."""
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return torch.cat([flat_output(t) for t in y])
    return y.flatten()


@torch.no_grad()
def output_difference(reference: nn.Module, other: nn.Module, input_size: Sequence[int], *,
                      seed: int = 0, batch_size: int = 2) -> tuple[float, float]:
    """(max |other - reference|, max |reference|) in eval mode on a seeded random input.

    Uses its own generator (torch's global RNG is left alone) and restores both models'
    train/eval modes afterwards.
    """
    generator = torch.Generator().manual_seed(seed)
    param = next(iter(reference.parameters()), None)
    x = torch.randn(batch_size, *input_size, generator=generator)
    if param is not None:
        x = x.to(param.device, param.dtype)
    modes = {m: m.training for model in (reference, other) for m in model.modules()}
    try:
        reference.eval()
        other.eval()
        y0, y1 = flat_output(reference(x)), flat_output(other(x))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return float((y0 - y1).abs().max()), float(y0.abs().max())


def summarize(converted: Any, *, compare: bool = True) -> dict[str, Any]:
    """Counts before/after, per converted site, and (with ``compare`` and init=preserve)
    the largest output difference to the baseline, for a
    :class:`~autobuild.rewrite.Converted`."""
    from autobuild.counting import count

    plan, base = converted.plan, converted.baseline
    root = base.root
    model_root = converted.model.get_submodule(root) if root else converted.model
    base_root = base.module.get_submodule(root) if root else base.module
    before, after = count(base_root, base.input_size), count(model_root, base.input_size)
    local = (lambda name: name[len(root) + 1:]) if root else (lambda name: name)
    sites = []
    for change in converted.changes:
        name = local(change.site.split("#")[0]) if change.site != "network" else ""
        sites.append({"site": change.site, "family": change.family, "before": change.before,
                      "after": change.after,
                      "params": {"before": change.params_before, "after": change.params_after},
                      "macs": {"before": before.module_macs.get(name, 0),
                               "after": after.module_macs.get(name, 0)}})
    result: dict[str, Any] = {
        "model": plan.model,
        "family": plan.family,
        "options": plan.conversions[0].options if len(plan.conversions) == 1 else {},
        "init": plan.init,
        "input_size": list(base.input_size),
        "counted": root or "model",
        "sites": sites,
        "params": {"before": before.params, "after": after.params},
        "macs": {"before": before.macs, "after": after.macs},
        "flops": {"before": before.flops, "after": after.flops},
        "max_abs_diff": None,
    }
    if plan.init == "preserve" and compare:
        result["max_abs_diff"], result["max_abs_output"] = output_difference(
            base_root, model_root, base.input_size)
    return result
