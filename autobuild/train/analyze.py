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

:func:`write_analysis` writes these as CSV files and PNG plots
(:mod:`autobuild.train.analyze_plots`); :func:`write_comparison` sets two runs side by side.
Nothing is changed: BN statistics, ``requires_grad``, the training flag and the global RNG
are as they were.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Analysis", "LayerStats", "TermStats", "collect", "layers_of",
           "weight_terms", "write_analysis", "write_comparison", "write_csv_rows"]

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
    def sites(self) -> list[LayerStats]:
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


def _site_of(name: str, family: str, paths: dict[str, str]) -> str:
    """The converted site whose module holds layer ``name``: the innermost one; a site
    built at the root (Dirac's ``network``) holds the family's layers only."""
    best, depth = "", -1
    for site, path in paths.items():
        inside = name == path or name.startswith(path + ".") if path else bool(family)
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
    from autobuild.rewrite import site_modules

    device = torch.device(device)
    layers = layers_of(model)
    paths = site_modules(model)
    stats = {name: LayerStats(name, type(m).__name__, fam,
                              sum(p.numel() for p in m.parameters()),
                              site=_site_of(name, fam, paths))
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


# ---- files ------------------------------------------------------------------------------
def write_csv_rows(path: str, rows: Sequence[dict[str, Any]], header: Sequence[str]) -> None:
    """A CSV file written atomically (temporary file in the same folder, then renamed)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()
                         if k in header})
    from autobuild.files import atomic_write_text

    atomic_write_text(path, buf.getvalue())


def _histogram_rows(analysis: Analysis, bins: int) -> list[dict[str, Any]]:
    from autobuild.train.analyze_plots import bin_range

    rows = []
    sources = [("activation", s.layer, "", s.sample) for s in analysis.layers
               if s.sample is not None and len(s.sample)]
    sources += [("weight", t.layer, t.term, t.values) for t in analysis.terms if t.numel]
    for kind, layer, term, values in sources:
        values = np.asarray(values, dtype=np.float64)  # float32 bins can be too narrow
        values = values[np.isfinite(values)]  # a diverged layer's inf/NaN: counted as absent
        if not len(values):
            continue
        counts, edges = np.histogram(values, bins=bins, range=bin_range(values))
        rows += [{"kind": kind, "layer": layer, "term": term, "bin": i, "left": float(edges[i]),
                  "right": float(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts)]
    return rows


def write_analysis(analysis: Analysis, out_dir: str, *, plots: bool = True,
                   bins: int = 40) -> list[str]:
    """``layers.csv`` (every layer, with the converted site it is part of), ``sites.csv``
    (the families' layers only), ``weights.csv``
    (per weight term), ``histograms.csv`` and, with ``plots``, PNG figures. Returns the
    paths written."""
    os.makedirs(out_dir, exist_ok=True)
    layer_cols = ["layer", "site"] + [f.name for f in fields(LayerStats)
                                      if f.name not in ("layer", "site", "sample")]
    term_cols = [f.name for f in fields(TermStats) if f.name != "values"]
    layer_rows = [{k: v for k, v in asdict(s).items() if k != "sample"} for s in analysis.layers]
    files = {"layers.csv": layer_rows,
             "sites.csv": [r for r in layer_rows if r["family"]]}
    written = []
    for name, rows in files.items():
        write_csv_rows(os.path.join(out_dir, name), rows, layer_cols)
        written.append(os.path.join(out_dir, name))
    write_csv_rows(os.path.join(out_dir, "weights.csv"),
                   [{k: getattr(t, k) for k in term_cols} for t in analysis.terms], term_cols)
    write_csv_rows(os.path.join(out_dir, "histograms.csv"), _histogram_rows(analysis, bins),
                   ["kind", "layer", "term", "bin", "left", "right", "count"])
    written += [os.path.join(out_dir, n) for n in ("weights.csv", "histograms.csv")]
    if plots:
        from autobuild.train.analyze_plots import plot_analysis

        written += plot_analysis(analysis, out_dir, bins=bins)
    return written


_COMPARED = ("act_std", "act_abs_max", "act_zero_frac", "act_saturated_frac", "grad_norm_mean",
             "weight_norm")


def write_comparison(a: Analysis, b: Analysis, out_dir: str, labels: tuple[str, str], *,
                     plots: bool = True) -> list[str]:
    """``compare.csv``: the layers both runs have (by qualified name, so a converted site
    meets the baseline layer it replaced), with each run's statistics and their ratio; and
    ``compare.png``."""
    by_name = {s.layer: s for s in b.layers}
    rows = []
    for s in a.layers:
        t = by_name.get(s.layer)
        if t is None:
            continue
        row: dict[str, Any] = {"layer": s.layer, "type_a": s.type, "type_b": t.type,
                               "family_a": s.family, "family_b": t.family}
        for k in _COMPARED:
            va, vb = getattr(s, k), getattr(t, k)
            row[f"{k}_a"], row[f"{k}_b"] = va, vb
            row[f"{k}_ratio"] = vb / va if va and math.isfinite(va) and va != 0 else math.nan
        rows.append(row)
    header = ["layer", "type_a", "type_b", "family_a", "family_b"]
    header += [f"{k}_{x}" for k in _COMPARED for x in ("a", "b", "ratio")]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.csv")
    write_csv_rows(path, rows, header)
    written = [path]
    if plots:
        from autobuild.train.analyze_plots import plot_comparison

        written += plot_comparison(rows, out_dir, labels)
    return written
