"""``autobuild variants``: the families, their options and the site kinds they take."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("variants", help="list families, their options and site kinds",
                       description="List the families with their options (type, default, "
                                   "choices, bounds) and the kinds of site they take.")
    p.add_argument("families", nargs="*", metavar="FAMILY",
                   help="only these families (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.variants import get_variant, list_variants

    chosen = ([get_variant(name) for name in dict.fromkeys(args.families)] if args.families
              else list_variants())
    variants = [v.describe() for v in chosen]
    if args.json:
        print_json(variants)
        return 0
    for v in variants:
        print(f"{v['name']}: {v['summary']}")
        print(f"  sites: {', '.join(v['site_kinds'])}; init: {', '.join(v['inits'])}")
        print(f"  paper: {v['paper']}")
        for o in v["options"]:
            print(f"  --option {o['name']}={o['default']}{_allowed(o)}  {o['help']}")
    return 0


def _allowed(option: dict[str, Any]) -> str:
    """What the option takes: its choices, else its bounds and special words."""
    if option["choices"]:
        return f" [{'|'.join(map(str, option['choices']))}]"
    low, high = option["min"], option["max"]
    above = ">=" if option["min_inclusive"] else ">"
    bounds = (f"{low:g}..{high:g}" if low is not None and high is not None and above == ">="
              else f"{above} {low:g}" + (f", <= {high:g}" if high is not None else "")
              if low is not None else f"<= {high:g}" if high is not None else "")
    words = [str(w) for w in option["specials"]]
    shown = " or ".join(filter(None, [bounds, *words]))
    return f" [{option['type']} {shown}]" if shown else ""
