"""``autobuild search``: run (or continue) a placement search."""

from __future__ import annotations

import argparse
import shlex
from typing import Annotated, Any

from pydantic import Field

from autobuild.cli._common import DEVICE, PATH, STUDY, flag_value
from autobuild.cli.worker import add_heartbeat_arguments, heartbeat

#: A study's number of finished trials: at least 1, at most the space's own bound
#: (``SearchSpace.n_trials``).
N_TRIALS = flag_value(Annotated[int, Field(ge=1, le=100_000)], "number of trials")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("search", help="search where the new blocks go (Optuna)",
                       description="Run a placement search described by a YAML search space "
                                   "(see search_spaces/ and docs/search.md).")
    p.add_argument("space", type=PATH, help="search space YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key of the space, e.g. "
                   "budget.epochs=1 (repeatable)")
    p.add_argument("--n-trials", type=N_TRIALS, help="the study's number of finished trials "
                   "(shorthand for --set n_trials=N)")
    p.add_argument("--study", type=STUDY, help="study name (default: the space's name)")
    p.add_argument("--storage", type=PATH,
                   help="database URL (default: sqlite:///studies/<study>.db)")
    p.add_argument("--artifacts", type=PATH,
                   help="artifact directory every worker can reach (default: "
                   "beside the SQLite file, or studies/<study>-artifacts)")
    p.add_argument("--resume", action="store_true", help="continue the study where it stopped")
    p.add_argument("--join", action="store_true", help="create the study unless it exists, "
                   "then work on it (start this on every GPU/machine; PostgreSQL only)")
    p.add_argument("--device", type=DEVICE, help="auto, cpu, cuda, cuda:N (default: the space's)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    add_heartbeat_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.search import load_space
    from autobuild.search import run as run_search
    from autobuild.search.report import pareto_trials
    from autobuild.search.study import mask_url

    space = load_space(args.space, args.overrides)
    study = run_search(space, storage=args.storage, study_name=args.study, resume=args.resume,
                       join=args.join, n_trials=args.n_trials, device=args.device,
                       quiet=args.quiet, artifacts=args.artifacts, heartbeat=heartbeat(args))
    front = [str(t.number) for t in pareto_trials(study)]
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    named = f"trial{'s' if len(front) > 1 else ''} {', '.join(front)}" if front else "empty"
    report = f"autobuild report --study {shlex.quote(study.study_name)}"
    if args.storage:  # (a password stays masked: the user knows it)
        report += f" --storage {shlex.quote(mask_url(args.storage))}"
    print(f"study {study.study_name}: {done} trial{'s' if done != 1 else ''} finished "
          f"({len(study.trials)} in all), Pareto front: {named}; `{report}` writes the report")
    return 0
