"""``autobuild variants``: the families, their options and the site kinds they take."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("variants", help="list families, their options and site kinds",
                       description="List the families with their options (type, default, "
                                   "choices, bounds) and the kinds of site they take.")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.variants import list_variants

    variants = [v.describe() for v in list_variants()]
    if args.json:
        print_json(variants)
        return 0
    for v in variants:
        print(f"{v['name']}: {v['summary']}")
        print(f"  sites: {', '.join(v['site_kinds'])}; init: {', '.join(v['inits'])}")
        print(f"  paper: {v['paper']}")
        for o in v["options"]:
            choices = f" [{'|'.join(map(str, o['choices']))}]" if o["choices"] else ""
            print(f"  --option {o['name']}={o['default']}{choices}  {o['help']}")
    return 0
