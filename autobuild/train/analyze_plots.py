"""PNG figures of an :class:`~autobuild.train.analyze.Analysis` (matplotlib, Agg backend).

Layers are drawn in module order along the x axis; converted sites are marked in red.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from autobuild.errors import AutobuildError

__all__ = ["bin_range", "plot_analysis", "plot_comparison"]

_MAX_PANELS = 12  # histogram grids: the first sites (or evenly spread layers)



def bin_range(values: np.ndarray) -> tuple[float, float]:
    """The values' range, widened when (nearly) constant: numpy cannot split an empty or
    float-precision-wide range into bins."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-6 * max(1.0, abs(lo), abs(hi)):
        pad = 0.5 * max(1.0, abs(lo)) * 1e-3
        lo, hi = lo - pad, hi + pad
    return lo, hi

def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise AutobuildError("plots need matplotlib: pip install 'autobuild[analysis]'") from exc
    matplotlib.use("Agg", force=True)  # files only, never a window (also on headless nodes)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    from autobuild.files import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    return path


def _positive(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def _line(ax: Any, layers: Sequence[Any], key: str, label: str, log: bool = True) -> None:
    y = [getattr(s, key) for s in layers]
    x = np.arange(len(y))
    ax.plot(x, _positive(y) if log else np.asarray(y, dtype=float), lw=1, label=label)
    sites = [i for i, s in enumerate(layers) if s.family]
    if sites:
        ys = np.asarray(y, dtype=float)[sites]
        ax.scatter(sites, ys, s=12, c="tab:red", zorder=3,
                   label="layers of converted sites" if key == "act_std" else None)
    if log and np.isfinite(_positive(y)).any():  # (all NaN: a layer that overflowed)
        ax.set_yscale("log")
    ax.set_ylabel(label)


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]


def plot_analysis(analysis: Any, out_dir: str, *, bins: int = 40) -> list[str]:
    """activations.png, gradients.png, weights.png, activation_histograms.png and
    weight_histograms.png."""
    plt = _pyplot()
    layers = analysis.layers
    written = []

    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    _line(axes[0], layers, "act_std", "output std")
    _line(axes[0], layers, "act_abs_max", "max |output|")
    axes[0].set_ylabel("activation (log)")
    axes[0].legend(fontsize=8)
    for key, label in (("act_zero_frac", "zero"), ("act_saturated_frac", "saturated"),
                       ("act_dead_channel_frac", "dead channels")):
        axes[1].plot(np.arange(len(layers)), [getattr(s, key) for s in layers], lw=1,
                     label=label)
    axes[1].set_ylabel("fraction")
    axes[1].set_xlabel("layer (module order)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"activations over {analysis.images} images, {len(layers)} layers, "
                 f"{len(analysis.site_names)} converted sites "
                 f"({len(analysis.family_layers)} of the layers)")
    written.append(_save(fig, os.path.join(out_dir, "activations.png")))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    _line(ax, layers, "grad_norm_mean", "gradient norm (mean over batches)")
    _line(ax, layers, "weight_norm", "weight norm")
    ax.set_xlabel("layer (module order)")
    ax.legend(["gradient norm", "weight norm"], fontsize=8)
    written.append(_save(fig, os.path.join(out_dir, "gradients.png")))
    plt.close(fig)

    written.append(_plot_terms(plt, analysis, out_dir))
    panels = _spread(analysis.family_layers or layers, _MAX_PANELS)
    written.append(_grid(plt, [(s.layer, [("output", s.sample)]) for s in panels],
                         os.path.join(out_dir, "activation_histograms.png"), bins,
                         "activation histograms (sampled)"))
    by_layer: dict[str, list[tuple[str, Any]]] = {}
    for t in analysis.terms:
        if t.role in ("first-order", "second-order"):
            by_layer.setdefault(t.layer, []).append((f"{t.term} ({t.role})", t.values))
    names = [s.layer for s in panels if s.layer in by_layer] or _spread(list(by_layer),
                                                                        _MAX_PANELS)
    written.append(_grid(plt, [(n, by_layer[n]) for n in names],
                         os.path.join(out_dir, "weight_histograms.png"), bins,
                         "weight histograms per term"))
    return written


def _plot_terms(plt: Any, analysis: Any, out_dir: str) -> str:
    """Weight std per layer, first- and second-order terms as separate series."""
    fig, ax = plt.subplots(figsize=(10, 4))
    order = {s.layer: i for i, s in enumerate(analysis.layers)}
    for role, colour in (("first-order", "tab:blue"), ("second-order", "tab:orange")):
        pts = [(order[t.layer], t.std) for t in analysis.terms if t.role == role]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.scatter(x, _positive(y), s=10, c=colour, label=f"{role} weights")
    ax.set_yscale("log")
    ax.set_xlabel("layer (module order)")
    ax.set_ylabel("weight std")
    ax.legend(fontsize=8)
    path = _save(fig, os.path.join(out_dir, "weights.png"))
    plt.close(fig)
    return path


def _grid(plt: Any, panels: list[tuple[str, list[tuple[str, Any]]]], path: str, bins: int,
          title: str) -> str:
    n = max(1, len(panels))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for label, values in series:
            v = np.asarray(values if values is not None else [], dtype=float)
            v = v[np.isfinite(v)]
            if len(v):
                ax.hist(v, bins=bins, range=bin_range(v), histtype="step", label=label)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        if len(series) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_comparison(rows: Sequence[dict[str, Any]], out_dir: str,
                    labels: tuple[str, str]) -> list[str]:
    """compare.png: each run's activation std, max |x| and gradient norm per shared layer."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    x = np.arange(len(rows))
    for ax, key, title in zip(axes, ("act_std", "act_abs_max", "grad_norm_mean"),
                              ("output std", "max |output|", "gradient norm"), strict=True):
        for suffix, label in zip(("a", "b"), labels, strict=True):
            ax.plot(x, _positive([r[f"{key}_{suffix}"] for r in rows]), lw=1, label=label)
        changed = [i for i, r in enumerate(rows) if r["family_a"] or r["family_b"]]
        if changed:  # marked on the run where the layer is a converted one
            ax.scatter(changed, _positive([rows[i][f"{key}_{'a' if rows[i]['family_a'] else 'b'}"]
                                           for i in changed]), s=10, c="tab:red", zorder=3,
                       label="layers of converted sites")
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("layer both runs have (module order)")
    fig.suptitle(f"{labels[0]} vs {labels[1]}")
    path = _save(fig, os.path.join(out_dir, "compare.png"))
    plt.close(fig)
    return [path]
