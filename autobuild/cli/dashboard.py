"""``autobuild dashboard``: optuna-dashboard on a study's storage and artifacts."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import PATH, PORT, STUDY


def add_parser(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard on 127.0.0.1",
                       description="Serve optuna-dashboard on 127.0.0.1 for a study's storage "
                                   "and artifacts; prints the URL.")
    p.add_argument("--storage", type=PATH, help="database URL (default: the study's, or the only "
                   "studies/*.db)")
    p.add_argument("--study", type=STUDY,
                   help="study name (locates its default storage and artifacts)")
    p.add_argument("--artifacts", type=PATH,
                   help="artifact directory (default: beside the storage)")
    p.add_argument("--port", type=PORT, help="port (default: a free one)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.search.dashboard import resolve_storage, serve

    serve(resolve_storage(args.storage, args.study), study=args.study, port=args.port,
          artifacts=args.artifacts)
    return 0
