"""``autobuild status``: trials by state, live workers, Pareto size and ETA of studies."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autobuild.cli._common import PATH, STUDY, table


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="where a search stands (fails stale trials too)",
                       description="Trials by state, live workers, Pareto size and ETA of "
                                   "every study in a storage (or one); re-queues the trials "
                                   "of dead workers.")
    p.add_argument("--storage", type=PATH, help="database URL (default: the study's SQLite file)")
    p.add_argument("--study", type=STUDY, help="one study (default: every study in the storage)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"


def run(args: argparse.Namespace) -> int:
    from autobuild.search.dashboard import resolve_storage
    from autobuild.search.status import storage_status

    rows = storage_status(resolve_storage(args.storage, args.study), args.study)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table([[r["study"], f"{r['finished']}/{r['n_trials'] or '?'}",
                  " ".join(f"{k.lower()} {v}" for k, v in sorted(r["states"].items())),
                  str(len(r["workers_alive"])), str(r["pareto_size"]), _eta(r["eta_s"])]
                 for r in rows],
                ["study", "finished", "trials by state", "workers", "pareto", "ETA"]))
    for r in rows:  # why trials failed: the last few (all of them: --json)
        failed = list(r["failed"].items())
        for number, reason in failed[-_SHOWN_FAILURES:]:
            print(f"{r['study']}: trial {number} failed: {reason}")
        if len(failed) > _SHOWN_FAILURES:
            print(f"{r['study']}: {len(failed) - _SHOWN_FAILURES} earlier failed trials "
                  "(--json lists them)")
    return 0


_SHOWN_FAILURES = 5
