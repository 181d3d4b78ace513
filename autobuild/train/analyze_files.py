"""What :func:`autobuild.train.analyze.collect` measured, as files: CSV tables (written
atomically) and, through :mod:`autobuild.train.analyze_plots`, PNG figures; and two runs'
measurements side by side."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from autobuild.train.analyze import Analysis, LayerStats, TermStats

__all__ = ["write_analysis", "write_comparison", "write_csv_rows"]


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
    meets the baseline layer it replaced), with each run's statistics (``_a``: ``a``'s,
    ``_b``: ``b``'s) and their ratio b / a; and ``compare.png``."""
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
