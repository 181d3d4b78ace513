"""``autobuild convert``: build a converted model, print what changed, optionally save it."""

from __future__ import annotations

import argparse
import os
from typing import Any

from autobuild.cli._common import (
    PATH,
    add_conversion_arguments,
    model_from_args,
    print_json,
    print_summary,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a baseline; print counts; optionally save",
                       description="Convert a baseline (or rebuild a plan) with one family "
                                   "(--to) or a mixed placement (--placement); print what "
                                   "changed and the counts before/after; --out saves plan + "
                                   "weights.")
    add_conversion_arguments(p, model_required=False)
    p.add_argument("--out", type=PATH, help="directory for plan.yaml + weights.safetensors")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out as a whole (in one step)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.files import ensure_writable_dir
    from autobuild.io import save
    from autobuild.summary import summarize

    if args.out:  # refuse before the (possibly slow) conversion
        # --force replaces --out whole: not the saved model, plan or files it reads
        ensure_writable_dir(args.out, force=args.force, writes="model", keep=[
            p for p in (args.model, args.plan, args.placement, args.weights)
            if p and os.path.exists(p)])
    model, analysis = model_from_args(args)
    summary = summarize(model, analysis)
    if args.out:
        save(model, args.out, force=args.force)
        summary["out"] = args.out
    if args.json:
        print_json(summary)
    else:
        print_summary(summary)
        if args.out:
            print(f"saved plan + weights to {args.out}")
    return 0
