"""``autobuild sites``: where a family can put its blocks in a baseline."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import human, parse_options, parse_size, print_json, table


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sites", help="list the candidate sites of a family in a baseline")
    p.add_argument("model", help="baseline name (see `autobuild models`)")
    p.add_argument("--to", dest="family", required=True, help="family (see `autobuild variants`)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="family option, repeatable")
    p.add_argument("--num-classes", type=int, help="classifier outputs")
    p.add_argument("--input-size", type=parse_size, help="C,H,W used for shapes and counts")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.rewrite import candidate_sites, resolve_baseline

    base = resolve_baseline(args.model, num_classes=args.num_classes, input_size=args.input_size)
    sites = candidate_sites(base, args.family, parse_options(args.option))
    if args.json:
        print_json([s.to_dict() for s in sites])
        return 0
    rows = [[s.name, s.kind, str(s.in_channels), str(s.out_channels),
             "x".join(map(str, s.kernel_size)) or "-", str(s.stride),
             "x".join(map(str, s.output_shape)), human(s.params), human(s.macs)]
            for s in sites]
    print(table(rows, ["site", "kind", "in", "out", "kernel", "stride", "output", "params",
                       "MACs"]))
    print(f"{len(sites)} {args.family} sites in {args.model}")
    return 0
