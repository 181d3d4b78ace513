"""``autobuild inspect``: load a saved model and print its summary."""

from __future__ import annotations

import argparse
import os
from typing import Any

from autobuild.cli._common import PATH, print_json, print_summary
from autobuild.errors import AutobuildError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="load a saved model and print its summary",
                       description="Load a saved model (plan + weights) and print its "
                                   "converted sites and counts.")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a saved model directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.api import plan_baseline
    from autobuild.io import load, load_plan
    from autobuild.rewrite import Analysis
    from autobuild.summary import nonfinite_tensors, summarize

    model = load(args.run_dir)
    # The preservation error is only meaningful against the baseline's own weights (those
    # the plan file names: the loaded model's record does not keep them); without them
    # the baseline's structure (on the meta device) gives the counts.
    plan = load_plan(args.run_dir)
    unloadable = None
    trained = os.path.exists(os.path.join(args.run_dir, "train.yaml"))  # (moved by training)
    measurable = bool(plan.weights) and plan.init == "preserve" and not trained
    if measurable:
        try:
            analysis = Analysis(plan_baseline(plan))
        except AutobuildError as exc:  # (a file moved since, a download offline)
            unloadable = f"not measurable: the baseline's weights do not load ({exc})"
    if not measurable or unloadable:
        analysis = Analysis(plan_baseline(plan, device="meta"))
    summary = summarize(model, analysis, compare=measurable and not unloadable)
    if unloadable:
        summary["max_abs_diff_note"] = unloadable
    elif trained and plan.init == "preserve":
        summary["max_abs_diff_note"] = ("not a preservation check: the model was trained "
                                        "after its conversion")
    summary["run"] = args.run_dir
    summary["nonfinite"] = nonfinite_tensors(model)
    if args.json:
        print_json(summary)
        return 0
    print_summary(summary)
    bad = summary["nonfinite"]
    if bad:
        names = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        print(f"  weights: {sum(bad.values())} NaN/inf values in {len(bad)} tensors "
              f"({names}): the model is unusable")
    else:
        print("  weights: all finite")
    return 0
