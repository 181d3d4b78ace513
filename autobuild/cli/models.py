"""``autobuild models``: the baselines, one line each."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list baselines",
                       description="List the registered baselines, one line each.")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.models import list_models

    entries = list_models()
    if args.json:
        print_json([{"name": e.name, "source": e.source, "input_size": e.input_size,
                     "num_classes": e.num_classes, "description": e.description}
                    for e in entries])
        return 0
    for e in entries:
        size = "x".join(map(str, e.input_size))
        print(f"{e.name:34s} {e.source:12s} {size:10s} {e.description}")
    print("timm models: timm:<name> (needs the 'timm' extra)")
    return 0
