"""What a conversion changed: counts before/after, per converted site, and how far the
converted model's output is from the baseline's (the numbers ``convert``/``inspect`` print)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autobuild.rewrite import Analysis, count_module, param_count, record_of, root_of

__all__ = ["flat_output", "nonfinite_tensors", "output_difference", "summarize"]


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


def nonfinite_tensors(model: nn.Module) -> dict[str, int]:
    """Parameter and buffer name -> how many of its values are NaN or infinite (only those
    that hold any): weights saved from a run that blew up are unusable, whatever the counts."""
    bad = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() or t.is_complex():
            n = int(t.numel() - torch.isfinite(t).sum())
            if n:
                bad[name] = n
    return bad


def summarize(model: nn.Module, analysis: Analysis, *, compare: bool = True) -> dict[str, Any]:
    """Counts of the baseline (``analysis``) and of the built ``model``, one row per
    converted site, and, with ``compare`` and init=preserve, the largest output difference
    to the baseline (whose weights ``analysis`` holds)."""
    record = record_of(model)
    plan = record.plan
    base = analysis.baseline
    root = root_of(model)
    after = count_module(root, base.input_size)
    local = (lambda path: path[len(base.root) + 1:] if path.startswith(base.root + ".")
             else "") if base.root else (lambda path: path)
    sites = []
    order = {s.name: i for i, s in enumerate(analysis.sites())}  # the graph's order
    for name, choice in sorted(plan.placement.items(), key=lambda item: order[item[0]]):
        site = analysis.site(name)
        path = record.site_modules.get(name, site.target)
        module = model.get_submodule(path) if path else model
        sites.append({"site": name, "family": choice.family, "choice": choice.short(),
                      "before": site.module_type, "after": type(module).__name__,
                      "params": {"before": site.params, "after": param_count(module)},
                      "macs": {"before": site.macs,
                               "after": after.module_macs.get(local(path), 0)}})
    result: dict[str, Any] = {
        "model": plan.model,
        "model_args": dict(plan.model_args),
        "family": plan.family,
        "placement": plan.placement.summary(),
        "placement_key": plan.placement.key,
        "options": plan.conversions[0].options if len(plan.conversions) == 1 else {},
        "init": plan.init,
        "input_size": list(base.input_size),
        "counted": base.root or "model",
        "sites": sites,
        "changes": [vars(c) for c in record.changes],
        "params": {"before": analysis.counts.params, "after": after.params},
        "macs": {"before": analysis.counts.macs, "after": after.macs},
        "flops": {"before": analysis.counts.flops, "after": after.flops},
        "max_abs_diff": None,
    }
    reference = next(iter(base.root_module.parameters()), None)
    loaded = reference is None or not reference.is_meta  # (only its structure: no outputs)
    if plan.init == "preserve" and compare and loaded:
        result["max_abs_diff"], result["max_abs_output"] = output_difference(
            base.root_module, root, base.input_size)
    elif plan.init == "preserve":
        result["max_abs_diff_note"] = NO_REFERENCE if loaded or not plan.weights else (
            "not measured here: `autobuild inspect` measures it against the baseline's "
            "weights file")
    return result


#: Why a preserving conversion of a baseline without named weights cannot be checked later.
NO_REFERENCE = ("not measurable from the saved model: its baseline's weights were drawn at "
                "random when it was converted and are not saved (`convert` measured it then; "
                "convert with --weights to keep a reference)")
