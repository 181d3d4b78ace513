"""Reports of a study: ``trials.csv`` (pandas, explicit columns), ``report.md`` (the Pareto
front as a table), ``pareto.png`` (matplotlib: feasible, infeasible, dominated and pruned
trials distinguished, the baseline marked), ``ri.csv`` and the hypervolume of the front.

Hypervolume. Each feasible finished trial is the point (1 - top1/100, cost/baseline cost)
for the study's first cost objective, both to minimise; the reference point is (1, 2):
0% top-1 and twice the baseline's cost. The hypervolume is the area those points dominate
inside the reference box (Optuna's own WFG implementation): 0 for nothing useful, larger
is better, comparable across studies of the same baseline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import optuna

from autobuild.errors import AutobuildError

__all__ = ["REFERENCE_POINT", "failure_reason", "hypervolume", "pareto_trials", "trials_frame",
           "write_report"]

REFERENCE_POINT = (1.0, 2.0)
_COLUMNS = ["number", "state", "placement", "top1", "params", "macs", "flops", "latency_ms",
            "feasible", "trained", "pruned_at_epoch", "reused_from", "seed_kind",
            "wall_time_s", "placement_key", "fail_reason"]


_COST_LABELS = {"macs": "MACs", "params": "params", "flops": "FLOPs", "latency_ms": "latency"}


def _cost_name(study: optuna.Study) -> str:
    names = study.metric_names or []
    return next((n for n in names if n != "top1"), "macs")


def _row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {"number": t.number, "state": t.state.name, "placement": a.get("placement"),
            "top1": None,
            **{k: a.get(k) for k in ("params", "macs", "flops", "latency_ms", "feasible",
                                     "trained", "pruned_at_epoch", "reused_from", "seed_kind",
                                     "wall_time_s")},
            "placement_key": a.get("placement_key")}


def failure_reason(trial: optuna.trial.FrozenTrial,
                   trials: Sequence[optuna.trial.FrozenTrial]) -> str | None:
    """Why a FAIL trial failed (None for any other state): its recorded reason (a diverged
    run), or what became of it: interrupted or its worker lost, and the trial that retried
    it; a surplus trial started after the study had its trials."""
    if trial.state != optuna.trial.TrialState.FAIL:
        return None
    a = trial.user_attrs
    if "fail_reason" in a:
        return str(a["fail_reason"])
    if a.get("surplus"):
        return "not needed: the study had its trials when it started"
    later = [t for t in trials if t.number > trial.number]
    stale = next((t for t in later
                  if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number), None)
    if stale is not None:
        return f"its worker died or stopped its heartbeat; retried as trial {stale.number}"
    again = next((t for t in later if t.user_attrs.get("requeued_from") == trial.number), None)
    if again is not None:
        return f"interrupted (Ctrl-C or SIGTERM); re-queued as trial {again.number}"
    return "interrupted or its worker lost; not re-queued"


def trials_frame(study: optuna.Study) -> Any:
    """One row per trial with the columns of ``_COLUMNS`` (top-1 of pruned trials: the last
    epoch reached; of failed, interrupted, running and never trained trials: empty;
    ``fail_reason``: :func:`failure_reason`)."""
    import pandas as pd

    names = study.metric_names or ["top1"]
    rows = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        row = _row(t)
        row["fail_reason"] = failure_reason(t, trials)
        values = dict(zip(names, t.values or [], strict=False))
        row["top1"] = values.get("top1")
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            row["top1"] = None  # failed, interrupted or running: no result to show
        elif row["top1"] is None and t.user_attrs.get("top1_per_epoch"):
            row["top1"] = t.user_attrs["top1_per_epoch"][-1]
        if t.user_attrs.get("trained") is False:
            row["top1"] = None  # never trained: no accuracy to show
        rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Feasible trials on the Pareto front (Optuna's best_trials), by cost."""
    if len(study.directions) == 1:
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return [study.best_trial] if done else []
    cost = _cost_name(study)
    # A placement sampled again reuses its result: the front lists it once, by the trial
    # that trained it (the lowest number).
    first: dict[str, optuna.trial.FrozenTrial] = {}
    for t in sorted(study.best_trials, key=lambda t: t.number):
        first.setdefault(t.user_attrs.get("placement_key", str(t.number)), t)
    return sorted(first.values(), key=lambda t: (t.user_attrs.get(cost, 0), t.number))


def hypervolume(study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None
                ) -> float:
    """See the module docstring; ``trials`` restricts it to some trials (e.g. the first N).
    Dominated points add nothing, so every feasible trained trial is passed as it is."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    baseline = study.user_attrs.get("baseline") or {}
    cost = _cost_name(study)
    names = study.metric_names or ["top1"]
    if "top1" not in names or not baseline.get(cost):
        return 0.0
    pool = study.get_trials(deepcopy=False) if trials is None else trials
    points = []
    for t in pool:
        a = t.user_attrs
        if t.state != optuna.trial.TrialState.COMPLETE or not a.get("trained", True) \
                or not a.get("feasible", True) or cost not in a:
            continue
        p = (1 - t.values[names.index("top1")] / 100, a[cost] / baseline[cost])
        if p[0] <= REFERENCE_POINT[0] and p[1] <= REFERENCE_POINT[1]:
            points.append(p)
    if not points:
        return 0.0
    return float(compute_hypervolume(np.array(points), np.array(REFERENCE_POINT)))


def _markdown(study: optuna.Study, frame: Any) -> str:
    baseline = study.user_attrs.get("baseline") or {}
    cost = _cost_name(study)
    label = _COST_LABELS.get(cost, cost)
    unit = " (ms)" if cost == "latency_ms" else ""
    extra_head = "" if cost in ("params", "macs") else f" {label}{unit} |"
    lines = [f"# Study {study.study_name}", "",
             f"{len(frame)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in
                                                   frame["state"].value_counts().items()), "",
             f"Baseline: {baseline.get('params', 0) / 1e6:.3f}M params, "
             f"{baseline.get('macs', 0) / 1e6:.2f}M MACs.", "",
             "## Pareto front", "",
             # the ratio is the front's own cost (MACs, params, FLOPs or latency)
             f"| trial | top-1 (%) | params | MACs |{extra_head} vs baseline {label} | "
             "placement |", "|---|---|---|---|" + "---|" * bool(extra_head) + "---|---|"]
    for t in pareto_trials(study):
        a = t.user_attrs
        top1 = dict(zip(study.metric_names or ["top1"], t.values, strict=False)).get("top1")
        ratio = a.get(cost, 0) / baseline[cost] if baseline.get(cost) else float("nan")
        extra = "" if cost in ("params", "macs") else (
            f" {a.get(cost, 0) / 1e6:.2f}M |" if cost == "flops" else f" {a.get(cost, 0):.3g} |")
        lines.append(f"| {t.number} | {top1:.2f} | {a.get('params', 0) / 1e6:.3f}M | "
                     f"{a.get('macs', 0) / 1e6:.2f}M |{extra} {ratio:.2f}x | "
                     f"{a.get('placement', '')} |")
    lines += ["", f"Hypervolume (reference: 0% top-1, 2x the baseline's {cost}): "
                  f"{hypervolume(study):.4f}", ""]
    missing = next((t.user_attrs["ri_error"] for t in study.get_trials(deepcopy=False)
                    if "ri_error" in t.user_attrs), None)
    if "ri" not in study.user_attrs and missing:  # (ri.csv is empty: say why)
        lines += [f"RI: not measured, so no revert seeds ({missing}).", ""]
    return "\n".join(lines)


def _plot(study: optuna.Study, frame: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = study.user_attrs.get("baseline") or {}
    cost = _cost_name(study)
    front = {t.number for t in pareto_trials(study)}
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    trained = frame[frame["top1"].notna() & frame[cost].notna()]
    groups = {
        "Pareto front": trained[trained["number"].isin(front)],
        "dominated": trained[~trained["number"].isin(front) & (trained["state"] == "COMPLETE")],
        "stopped early (last epoch)": trained[trained["state"] == "PRUNED"],
    }
    styles = {"Pareto front": dict(c="tab:red", marker="o", s=40, zorder=3),
              "dominated": dict(c="tab:gray", marker="o", s=20, alpha=0.7),
              "stopped early (last epoch)": dict(c="tab:orange", marker="x", s=25)}
    for label, sub in groups.items():
        if len(sub):
            ax.scatter(sub[cost] / 1e6, sub["top1"], label=label, **styles[label])
    infeasible = frame[frame["feasible"] == False]  # noqa: E712 (pandas elementwise)
    if len(infeasible):
        ax.scatter(infeasible[cost] / 1e6, [0] * len(infeasible), c="black", marker="v",
                   s=20, label="infeasible (not trained)")
    front_df = groups["Pareto front"].sort_values(cost)
    if len(front_df):
        ax.plot(front_df[cost] / 1e6, front_df["top1"], c="tab:red", lw=1, zorder=2)
    if baseline.get(cost):
        ax.axvline(baseline[cost] / 1e6, c="tab:blue", ls="--", lw=1, label="baseline cost")
        base_rows = trained[trained["seed_kind"] == "baseline"]
        if len(base_rows):
            ax.scatter(base_rows[cost] / 1e6, base_rows["top1"], c="tab:blue", marker="*",
                       s=120, zorder=4, label="baseline")
    ax.set_xlabel(f"{cost} (millions)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{study.study_name}: top-1 vs {cost}")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it hid the infeasible trials (drawn at 0%, high cost).
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    from autobuild.files import atomic_file

    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def write_report(study: optuna.Study, out: str, *, force: bool = False,
                 keep: Sequence[str] = ()) -> dict[str, Any]:
    """Write the report files as the directory ``out``, in one step (a non-empty ``out`` is
    refused unless ``force``, which replaces it whole, unless it holds one of ``keep``, e.g.
    the study's database); returns what was written."""
    import pandas as pd

    from autobuild.files import (
        atomic_write_text,
        ensure_writable_dir,
        staged_directory,
    )
    from autobuild.search.importance import COLUMNS as RI_COLUMNS

    ensure_writable_dir(out, force=force, keep=keep, writes="report")
    if not study.get_trials(deepcopy=False):
        raise AutobuildError(f"study {study.study_name!r} has no trials yet")
    frame = trials_frame(study)
    with staged_directory(out, force=force, writes="report") as staging:
        # (counts as integers: a column with empty cells would be written as 2.0)
        whole = {c: "Int64" for c in ("params", "macs", "flops", "pruned_at_epoch",
                                      "reused_from")}
        atomic_write_text(os.path.join(staging, "trials.csv"),
                          frame.astype(whole).to_csv(index=False))
        atomic_write_text(os.path.join(staging, "report.md"), _markdown(study, frame))
        _plot(study, frame, os.path.join(staging, "pareto.png"))
        # (a study whose RI was never measured gets the header alone, not an empty file)
        ri = pd.DataFrame(study.user_attrs.get("ri") or [], columns=RI_COLUMNS)
        atomic_write_text(os.path.join(staging, "ri.csv"), ri.to_csv(index=False))
    return {"out": out, "files": ["trials.csv", "report.md", "pareto.png", "ri.csv"],
            "trials": len(frame), "pareto": len(pareto_trials(study)),
            "hypervolume": hypervolume(study)}
