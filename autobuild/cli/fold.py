"""``autobuild fold``: Dirac convs and their batch norms folded into plain convs."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import PATH, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fold", help="fold Dirac convs and their BN into plain convs",
                       description="Fold every Dirac conv and its batch norm into one plain "
                                   "conv (exact to float precision) and save the result.")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a saved model directory")
    p.add_argument("--out", required=True, type=PATH, help="directory for the folded model")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out as a whole (in one step)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild import fold
    from autobuild.files import ensure_writable_dir
    from autobuild.io import load, save
    from autobuild.rewrite import plan_of
    from autobuild.summary import output_difference

    # (--force would delete the run it reads)
    ensure_writable_dir(args.out, force=args.force, keep=[args.run_dir], writes="model")
    model = load(args.run_dir)
    folded = fold(model)
    diff, scale = output_difference(model, folded, plan_of(model).input_size)
    save(folded, args.out, force=True)
    result = {"run": args.run_dir, "out": args.out, "max_abs_diff": diff,
              "max_abs_output": scale}
    if args.json:
        print_json(result)
    else:
        print(f"folded {args.run_dir} -> {args.out}: max |folded - unfolded| = {diff:.3g} "
              f"(largest output {scale:.3g})")
    return 0
