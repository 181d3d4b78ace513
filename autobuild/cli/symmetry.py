"""``autobuild symmetry``: QLNet's continuous symmetry applied to a saved model."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import PATH, print_json, recipe_value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("symmetry", help="apply QLNet's orthogonal symmetry; print the change",
                       description="Apply random orthogonal transforms of QLNet's continuous "
                                   "symmetry to a saved multiplicative model and print how "
                                   "much its output changes (it should not).")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a saved model directory")
    p.add_argument("--check", action="store_true",
                   help="compare outputs before and after (the default and only action)")
    p.add_argument("--seed", type=recipe_value("seed"), default=0,
                   help="seed of the random rotations (as train's --seed)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.io import load
    from autobuild.variants.multiplicative import check_symmetry

    model = load(args.run_dir)
    result = check_symmetry(model, seed=args.seed)
    if args.json:
        print_json(result)
    else:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items()))
    return 0
