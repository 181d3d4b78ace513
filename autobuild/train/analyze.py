"""What a (converted) network does inside: activations, gradients and weights per layer.

:func:`collect` runs a few batches through the model in eval mode with forward hooks on
every *layer* (Conv2d, Linear, batch norm, and every family's layer class — the converted
*sites*), then backpropagates the task's loss on the same batches. Per layer it measures

- activations (the layer's output, over every call and batch): mean, std, max |x|, the
  fraction of exact zeros, the fraction *saturated* (|x| >= ``saturation``, default 6: where
  ReLU6 and Hardswish clip and products of activations start to blow up), the fraction of
  *dead* channels (never positive: zero after a ReLU), and a histogram of a fixed-size
  random sample of the values;
- gradients: the norm of the gradient of the layer's own parameters, per batch (mean, max);
- weights, per *term*: a quadratic layer's branches separately (type ``ours``: a and b form
  the second-order product, c is the first-order term; see :func:`weight_terms`), other
  layers' own parameters, with the gradient norm of each term.

:func:`autobuild.train.analyze_files.write_analysis` writes these as CSV files and PNG plots
(:mod:`autobuild.train.analyze_plots`); ``write_comparison`` sets two runs side by side.
Nothing is changed: BN statistics, ``requires_grad``, the training flag and the global RNG
are as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Analysis", "LayerStats", "TermStats", "collect", "layers_of", "weight_terms"]

_PLAIN = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
_ROLES = {"ours": ("second-order", "second-order", "first-order"),
          "t4": ("second-order", "second-order"), "fan": ("second-order", "second-order")}


@dataclass
class TermStats:
    """One weight term of one layer (a quadratic branch, or a plain parameter)."""

    layer: str
    term: str
    role: str  # first-order, second-order, norm, bias, other
    numel: int
    mean: float
    std: float
    abs_max: float
    norm: float
    grad_norm: float = math.nan  # mean over the batches
    values: Any = field(default=None, repr=False)  # the flattened tensor (for histograms)


@dataclass
class LayerStats:
    layer: str
    type: str
    family: str  # the family of a converted layer; "" for a plain layer
    params: int
    site: str = ""  # the converted site (of the plan) the layer is part of; "" if none
    calls: int = 0
    act_mean: float = math.nan
    act_std: float = math.nan
    act_abs_max: float = math.nan
    act_zero_frac: float = math.nan
    act_saturated_frac: float = math.nan
    act_dead_channel_frac: float = math.nan
    grad_norm_mean: float = math.nan
    grad_norm_max: float = math.nan
    weight_norm: float = math.nan
    sample: Any = field(default=None, repr=False)  # sampled activation values (numpy)


@dataclass
class Analysis:
    layers: list[LayerStats]
    terms: list[TermStats]
    task: str
    images: int

    site_names: list[str] = field(default_factory=list)  # the plan's converted sites

    @property
    def family_layers(self) -> list[LayerStats]:
        """The layers of the families (a site may hold several: a QL block and its
        hardball; Dirac's whole-network site every conv)."""
        return [s for s in self.layers if s.family]


def _families() -> dict[type, str]:
    from autobuild.variants import list_variants

    return {cls: v.name for v in list_variants() for cls in v.leaf_modules}


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, family or "") of every layer, in module order."""
    families = _families()
    out = []
    for name, module in model.named_modules():
        family = next((f for cls, f in families.items() if isinstance(module, cls)), "")
        if family or isinstance(module, _PLAIN):
            out.append((name, module, family))
    return out


def _site_of(name: str, family: str, paths: dict[str, str], root: str = "") -> str:
    """The converted site whose module holds layer ``name``: the innermost one; a site
    built at the traced root (Dirac's ``network``; a detector's root is its backbone)
    holds the family's layers only."""
    best, depth = "", -1
    for site, path in paths.items():
        if path == root:
            inside = bool(family) and (not root or name.startswith(root + "."))
        else:
            inside = name == path or name.startswith(path + ".")
        if inside and len(path) > depth:
            best, depth = site, len(path)
    return best


def weight_terms(module: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(term, role, tensor) of a layer's own weights. A quadratic layer is split into its
    branches (``branch_weight``): ``ours`` → a, b (second-order product) and c (first
    order); t4 → a, b; fan → a, b and sq (W_c on x ⊙ x); t2 / t3 → a (second order);
    volterra → weight (first order) and quad (A_o, second order)."""
    qtype = getattr(module, "qtype", None)
    if qtype is not None and hasattr(module, "branch_weight"):
        if qtype == "volterra":
            return [("weight", "first-order", module.weight), ("quad", "second-order",
                                                               module.quad)]
        if qtype in ("t2", "t3"):
            return [("a", "second-order", module.weight)]
        terms = [(chr(ord("a") + i), role, module.branch_weight(i))
                 for i, role in enumerate(_ROLES[qtype])]
        if qtype == "fan":
            terms.append(("sq", "second-order", module.weight_sq))
        return terms
    terms = []
    for name, p in module.named_parameters(recurse=False):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            role = "norm"
        elif name == "bias":
            role = "bias"
        elif name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
            role = "first-order"
        else:
            role = "other"
        terms.append((name, role, p))
    return terms


class _Recorder:
    """Running activation statistics of one layer's outputs."""

    def __init__(self, saturation: float, sample: int, seed: int) -> None:
        self.saturation, self.sample = saturation, sample
        self.gen = torch.Generator().manual_seed(seed)
        self.n = self.calls = 0
        self.s = self.ss = self.zeros = self.sat = 0.0
        self.abs_max = 0.0
        self.chan_max: torch.Tensor | None = None
        self.samples: list[np.ndarray] = []

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        # Statistics now, inside the hook: an in-place ReLU may overwrite the output next.
        # In float64: squares of large float32 activations would overflow the sums.
        x = output.detach().double()
        self.calls += 1
        self.n += x.numel()
        self.s += float(x.sum())
        self.ss += float(x.square().sum())
        self.abs_max = max(self.abs_max, float(x.abs().max()) if x.numel() else 0.0)
        self.zeros += float((x == 0).sum())
        self.sat += float((x.abs() >= self.saturation).sum())
        if x.ndim >= 2:  # channels: dim 1 of conv/linear outputs, the last of (N, L, C)
            c = x.transpose(1, -1) if x.ndim == 3 else x
            cmax = c.transpose(0, 1).reshape(c.shape[1], -1).amax(1).cpu()
            if self.chan_max is None or self.chan_max.shape != cmax.shape:
                self.chan_max = cmax
            else:
                self.chan_max = torch.maximum(self.chan_max, cmax)
        flat = x.reshape(-1)
        if flat.numel() > self.sample:
            flat = flat[torch.randint(flat.numel(), (self.sample,), generator=self.gen)
                        .to(flat.device)]
        self.samples.append(flat.cpu().numpy())

    def fill(self, stats: LayerStats) -> None:
        if not self.n:
            return
        mean = self.s / self.n
        stats.calls = self.calls
        stats.act_mean = mean
        stats.act_std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0))
        stats.act_abs_max = self.abs_max
        stats.act_zero_frac = self.zeros / self.n
        stats.act_saturated_frac = self.sat / self.n
        if self.chan_max is not None:
            stats.act_dead_channel_frac = float((self.chan_max <= 0).float().mean())
        stats.sample = np.concatenate(self.samples)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _loss(model: nn.Module, task: str, batch: Any) -> torch.Tensor:
    """The training loss on ``batch`` with the model otherwise in eval mode (BN uses its
    running statistics, so nothing is updated)."""
    x, y = batch
    if task == "detection":
        # Validation targets keep crowd / difficult objects, which training leaves out.
        y = [{"boxes": t["boxes"][t["iscrowd"] == 0], "labels": t["labels"][t["iscrowd"] == 0]}
             if "iscrowd" in t else t for t in y]
        model.training = True  # the SSD itself computes its losses; its layers stay in eval
        try:
            return sum(model(x, y).values())  # type: ignore[return-value]
        finally:
            model.training = False
    return nn.functional.cross_entropy(model(x).float(), y)


def collect(model: nn.Module, task: str, batches: Sequence[Any], *,
            device: torch.device | str = "cpu", saturation: float = 6.0, sample: int = 4096,
            gradients: bool = True, seed: int = 0) -> Analysis:
    """Measure ``model`` on ``batches`` (classification ``(x, y)`` or detection
    ``(images, targets)``); see the module docstring."""
    from autobuild.rewrite import record_of, site_modules

    device = torch.device(device)
    layers = layers_of(model)
    paths = site_modules(model)
    record = record_of(model)
    root = record.root if record is not None else ""
    stats = {name: LayerStats(name, type(m).__name__, fam,
                              sum(p.numel() for p in m.parameters()),
                              site=_site_of(name, fam, paths, root))
             for name, m, fam in layers}
    recorders = {name: _Recorder(saturation, sample, seed + i)
                 for i, (name, _, _) in enumerate(layers)}
    was_training = model.training
    cuda = [device.index or 0] if device.type == "cuda" else []
    grads: dict[str, list[float]] = {name: [] for name, _, _ in layers}
    term_grads: dict[tuple[str, str], list[float]] = {}
    images = 0
    with torch.random.fork_rng(devices=cuda):
        model.eval()
        handles = [m.register_forward_hook(recorders[name]) for name, m, _ in layers]
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = _to(batch, device)
                    images += len(batch[0])
                    model(batch[0])
        finally:
            for h in handles:
                h.remove()
        if gradients:
            saved = {p: p.grad for p in model.parameters()}
            try:
                for batch in batches:
                    model.zero_grad(set_to_none=True)
                    _loss(model, task, _to(batch, device)).backward()
                    _record_grads(layers, grads, term_grads)
            finally:
                for p, g in saved.items():
                    p.grad = g
        model.train(was_training)
    for name, m, fam in layers:
        recorders[name].fill(stats[name])
        norms = grads[name]
        if norms:
            stats[name].grad_norm_mean = float(np.mean(norms))
            stats[name].grad_norm_max = float(np.max(norms))
        own = [p.detach().float() for p in _own_parameters(m, fam)]
        if own:
            stats[name].weight_norm = math.sqrt(sum(float(p.square().sum()) for p in own))
    terms = [_term_stats(name, term, role, t, term_grads.get((name, term)))
             for name, m, _ in layers for term, role, t in weight_terms(m)]
    return Analysis([stats[name] for name, _, _ in layers], terms, task, images,
                    sorted(paths))


def _record_grads(layers: Iterable[tuple[str, nn.Module, str]], grads: dict[str, list[float]],
                  term_grads: dict[tuple[str, str], list[float]]) -> None:
    for name, m, fam in layers:
        own = [p.grad for p in _own_parameters(m, fam) if p.grad is not None]
        if own:
            grads[name].append(math.sqrt(sum(float(g.float().square().sum()) for g in own)))
        if getattr(m, "qtype", None) is not None and m.weight.grad is not None:
            grad_terms = _grad_terms(m)
        else:
            grad_terms = [(t, p.grad) for t, p in m.named_parameters(recurse=False)]
        for term, g in grad_terms:
            if g is not None:
                term_grads.setdefault((name, term), []).append(float(g.float().norm()))


def _own_parameters(m: nn.Module, family: str) -> Iterable[nn.Parameter]:
    """A plain layer's own parameters; all those of a family's layer, which is one unit
    however it is built (a QL block's convs, a PDE layer's coefficient nets)."""
    return m.parameters(recurse=bool(family))


def _grad_terms(m: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """A quadratic layer's gradient split like its weights (:func:`weight_terms`)."""
    q = m.qtype
    if q == "volterra":
        return [("weight", m.weight.grad), ("quad", m.quad.grad)]
    if q in ("t2", "t3"):
        return [("a", m.weight.grad)]
    out = [(chr(ord("a") + i), m.branch_weight(i, m.weight.grad)) for i in range(len(_ROLES[q]))]
    if q == "fan":
        out.append(("sq", m.weight_sq.grad))
    return out


def _term_stats(layer: str, term: str, role: str, t: torch.Tensor,
                grads: list[float] | None) -> TermStats:
    v = t.detach().float().reshape(-1).cpu()
    n = v.numel()
    return TermStats(layer, term, role, n, float(v.mean()) if n else math.nan,
                     float(v.std()) if n > 1 else 0.0, float(v.abs().max()) if n else math.nan,
                     float(v.norm()), float(np.mean(grads)) if grads else math.nan, v.numpy())
