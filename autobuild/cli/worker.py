"""``autobuild worker``: one more worker on an existing study (another GPU or machine)."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import DEVICE, PATH, POSITIVE_INT, STUDY


def add_heartbeat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat", type=POSITIVE_INT, default=None, metavar="S",
                   help="seconds between a running trial's heartbeats (default 10)")
    p.add_argument("--grace", type=POSITIVE_INT, default=None, metavar="S",
                   help="a trial silent for this long is failed and re-queued (default 60)")


def heartbeat(args: argparse.Namespace) -> tuple[int, int] | None:
    from autobuild.search.study import GRACE_S, HEARTBEAT_S

    if args.heartbeat is None and args.grace is None:
        return None
    return (args.heartbeat or HEARTBEAT_S, args.grace or GRACE_S)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="add a worker to a study (PostgreSQL storage)",
                       description="Run trials of an existing study until it holds its "
                                   "n_trials finished trials; start one per GPU / machine.")
    p.add_argument("--storage", required=True, type=PATH, help="database URL, e.g. "
                   "postgresql+psycopg://user@host/autobuild")
    p.add_argument("--study", required=True, type=STUDY, help="study name")
    p.add_argument("--device", type=DEVICE, help="auto, cpu, cuda, cuda:N (default: the space's)")
    p.add_argument("--artifacts", type=PATH,
                   help="artifact directory every worker can reach (or s3://...)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    add_heartbeat_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.search.runner import run_worker

    study = run_worker(args.storage, args.study, device=args.device, quiet=args.quiet,
                       artifacts=args.artifacts, heartbeat=heartbeat(args))
    print(f"study {study.study_name}: done ({len(study.trials)} trials)")
    return 0
