"""``autobuild report``: trials.csv, report.md, pareto.png, ri.csv and the hypervolume."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autobuild.cli._common import PATH, STUDY


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, type=STUDY, help="study name")
    p.add_argument("--storage", type=PATH,
                   help="database URL (default: sqlite:///studies/<study>.db)")


def open_study(args: argparse.Namespace) -> Any:
    from autobuild.search.dashboard import resolve_storage
    from autobuild.search.study import load_study, open_storage

    url = resolve_storage(args.storage, args.study)
    return load_study(args.study, open_storage(url, heartbeat=False, create=False), url)


def kept_paths(args: argparse.Namespace, study: Any) -> list[str]:
    """What ``--out DIR --force`` must never replace (:func:`~autobuild.search.study.
    study_paths`)."""
    from autobuild.search.dashboard import resolve_storage
    from autobuild.search.study import study_paths

    return study_paths(resolve_storage(args.storage, args.study), study,
                       getattr(args, "artifacts", None))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write a study's report (CSV, markdown, Pareto plot)",
                       description="Write trials.csv, report.md, pareto.png and ri.csv of a "
                                   "study, and print the Pareto front and its hypervolume.")
    add_study_arguments(p)
    p.add_argument("--out", type=PATH, help="report directory (default: reports/<study>)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (an earlier report) as a whole")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from autobuild.search.report import write_report

    study = open_study(args)
    result = write_report(study, args.out or os.path.join("reports", args.study),
                          force=args.force, keep=kept_paths(args, study))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    with open(os.path.join(result["out"], "report.md")) as f:
        print(f.read())
    print(f"wrote {', '.join(result['files'])} to {result['out']}")
    return 0
