"""RI importance (QuadraLib's auto-builder, done deterministically).

For every converted site of a trained model, its higher-order part is switched off with
:func:`autobuild.masked` (an exact, reversible zero mask — never random dropout) and the
validation accuracy drop δ_A is measured on the same batches as the unmasked model. With
P_M and P_W the share of the model's parameters and MACs held by the site's converted
layers (those masking switches off: a quadratic conv, a QL block, a Global layer...),

    RI = P_M · P_W / max(δ_A, ε),        ε = 1 / N_val

(accuracies as fractions; ε is one validation image, the smallest drop the validation set
can resolve). High RI = expensive and unimportant: the first site to revert. One run costs
(sites + 1) evaluations of the validation set.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from autobuild.errors import AutobuildError
from autobuild.rewrite import count_module, mask_targets, masked, record_of, root_of

__all__ = ["importance"]

COLUMNS = ["site", "family", "choice", "params", "macs", "p_params", "p_macs", "top1",
           "top1_masked", "delta_top1", "ri"]


@torch.no_grad()
def _top1(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def _site_cost(root: nn.Module, layers: list[nn.Module], counts: Any) -> tuple[int, int]:
    """Params and MACs of the layers that carry a site's converted part (what masking
    switches off: a quadratic conv, a QL block, a Global layer, ...)."""
    names = {id(m): n for n, m in root.named_modules()}
    paths = [names[id(m)] for m in layers if id(m) in names]
    return (sum(counts.module_params.get(p, 0) for p in paths),
            sum(counts.module_macs.get(p, 0) for p in paths))


def _batches(data: Any, batch_size: int, device: torch.device, limit: int | None
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set, loaded once, as device tensors shared by every evaluation."""
    loader = torch.utils.data.DataLoader(data.val, batch_size=batch_size, shuffle=False)
    out = []
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append((x.to(device), y.to(device)))
    if not out:
        raise AutobuildError(f"{data.name} has no validation images to measure importance on")
    return out


def importance(model: nn.Module, data: Any, *, sites: Iterable[str] | None = None,
               batch_size: int = 256, device: str = "auto", max_batches: int | None = None,
               progress: bool = True) -> Any:
    """RI of every converted site of ``model`` (or of ``sites``) on ``data``'s validation
    split, as a pandas DataFrame sorted by RI (highest first); see the module docstring."""
    import pandas as pd
    from tqdm import tqdm

    from autobuild.train import build_data
    from autobuild.train.loop import check_fits, resolve_device

    record = record_of(model)
    if record is None or not record.plan.placement:
        raise AutobuildError("importance needs a converted model (its plan names the converted "
                             "sites); convert or load one first")
    names = list(record.plan.placement) if sites is None else list(sites)
    data = build_data(data) if isinstance(data, str) else data
    from autobuild.train.detection_data import DetectionData

    if isinstance(data, DetectionData):
        raise AutobuildError(f"importance measures a classifier's val top-1 (RI); {data.spec} "
                             "is detection data")
    check_fits(model, data)
    dev = resolve_device(device)
    was_training = model.training
    model = model.to(dev).eval()
    counts = count_module(root_of(model), record.plan.input_size or data.input_size)
    batches = _batches(data, batch_size, dev, max_batches)
    n_val = sum(len(y) for _, y in batches)
    epsilon = 1.0 / n_val
    bar = tqdm(total=len(names) + 1, desc="importance", unit="eval", file=sys.stderr,
               disable=not progress, leave=False)
    try:
        top1 = _top1(model, batches)
        bar.update()
        rows = []
        for name in names:
            with masked(model, [name]):
                top1_masked = _top1(model, batches)
            bar.update()
            params, macs = _site_cost(root_of(model), mask_targets(model, name), counts)
            p_params, p_macs = params / max(counts.params, 1), macs / max(counts.macs, 1)
            delta = top1 - top1_masked
            choice = record.plan.placement[name]
            rows.append({"site": name, "family": choice.family, "choice": choice.short(),
                         "params": params, "macs": macs, "p_params": p_params,
                         "p_macs": p_macs, "top1": 100 * top1, "top1_masked": 100 * top1_masked,
                         "delta_top1": 100 * delta,
                         "ri": p_params * p_macs / max(delta, epsilon)})
    finally:
        bar.close()
        model.train(was_training)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.sort_values("ri", ascending=False, kind="stable").reset_index(drop=True)
    frame.attrs.update({"epsilon": epsilon, "val_images": n_val, "top1": 100 * top1})
    return frame
