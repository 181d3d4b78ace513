"""``autobuild inspect``: load a saved model and print its summary."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import PATH, print_json, print_summary


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="load a saved model and print its summary",
                       description="Load a saved model (plan + weights) and print its "
                                   "converted sites and counts.")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a saved model directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.api import plan_baseline
    from autobuild.io import load
    from autobuild.rewrite import Analysis, plan_of
    from autobuild.summary import nonfinite_tensors, summarize

    model = load(args.run_dir)
    plan = plan_of(model)
    # The preservation error is only meaningful against the baseline's own weights; without
    # them the baseline's structure (on the meta device) gives the counts.
    real = bool(plan.weights)
    analysis = Analysis(plan_baseline(plan, device=None if real else "meta"))
    summary = summarize(model, analysis, compare=real)
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
