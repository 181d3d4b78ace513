"""``autobuild export``: a trial's model as a saved directory, ready for ``autobuild train``."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import NON_NEGATIVE_INT, PATH
from autobuild.cli.report import add_study_arguments, kept_paths, open_study


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="a trial's plan (and weights if kept) as a model dir",
                       description="Write a trial's plan (and its weights, if the study kept "
                                   "them) as a saved model directory, ready for `autobuild "
                                   "train`.")
    add_study_arguments(p)
    p.add_argument("--trial", type=NON_NEGATIVE_INT, required=True, help="trial number")
    p.add_argument("--out", required=True, type=PATH, help="directory to write")
    p.add_argument("--artifacts", type=PATH,
                   help="the study's artifact directory, as given to `search --artifacts` "
                   "(default: beside the SQLite file, or studies/<study>-artifacts)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.search.export import export_trial, train_command

    study = open_study(args)
    result = export_trial(study, args.trial, args.out, force=args.force,
                          artifacts=args.artifacts, keep=kept_paths(args, study))
    if result["trained_weights"]:
        print(f"trial {args.trial} ({result['placement']}) -> {args.out}: plan + trained "
              f"weights; `autobuild train {args.out} --data ...` trains it further")
    elif result["never_trained"]:
        print(f"trial {args.trial} ({result['placement']}) -> {args.out}: plan + initial "
              f"weights (seed {result['seed']}); the search never trained it (over a "
              f"constraint); trained with the search's budget by:\n  "
              f"{train_command(study, args.out)}")
    else:
        print(f"trial {args.trial} ({result['placement']}) -> {args.out}: plan + the initial "
              f"weights it trained from (seed {result['seed']}); trained as the search did "
              f"by:\n  {train_command(study, args.out)}")
    return 0
