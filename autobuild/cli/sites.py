"""``autobuild sites``: where a family can put its blocks in a baseline."""

from __future__ import annotations

import argparse
import os
from typing import Any

from autobuild.cli._common import (
    NUM_CLASSES,
    human,
    parse_options,
    parse_size,
    plural,
    print_json,
    table,
)
from autobuild.errors import AutobuildError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sites", help="list the candidate sites of a family in a baseline",
                       description="List the sites of a baseline with their shapes, params "
                                   "and MACs, and the families that take each (* marks a "
                                   "family's default sites).")
    p.add_argument("model", help="baseline name (see `autobuild models`)")
    p.add_argument("--to", dest="family", default="all",
                   help="family (see `autobuild variants`), or all (the default)"
                   ).once = True  # (given twice: refused, see Parser._refuse_repeats)
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="family option, repeatable")
    p.add_argument("--num-classes", type=NUM_CLASSES, help="classifier outputs")
    p.add_argument("--input-size", type=parse_size, help="C,H,W used for shapes and counts")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.api import analyze
    from autobuild.variants import get_variant, list_variants

    if os.path.isfile(os.path.join(args.model, "plan.yaml")):  # a saved model, not a name
        raise AutobuildError(f"{args.model!r} is a directory: `sites` lists a baseline's sites "
                             "(see `autobuild models`); `autobuild inspect DIR` shows a saved "
                             "model's converted sites")
    analysis = analyze(args.model, num_classes=args.num_classes, input_size=args.input_size)
    options = parse_options(args.option)
    if args.family == "all":
        if options:
            raise AutobuildError("--option needs one family (--to FAMILY), not all")
        variants = list_variants()
    else:
        variants = [get_variant(args.family)]
    takers: dict[str, list[str]] = {}
    for variant in variants:
        opts = variant.parse_options(options if args.family != "all" else {})
        candidates = analysis.sites(variant.name, opts)
        defaults = {s.name for s in _defaults(variant, candidates, opts)}
        names = {s.name for s in candidates}
        if args.family == "all":  # every layout/scope: some take other kinds of sites
            for value in _primary_choices(variant):
                more = variant.parse_options({variant.primary_option: value})
                names |= {s.name for s in analysis.sites(variant.name, more)}
        for name in names:
            takers.setdefault(name, []).append(variant.name + ("*" if name in defaults
                                                               else ""))
    sites = [s for s in analysis.sites() if s.name in takers]
    if args.json:
        print_json([{**s.to_dict(), "families": [f.rstrip("*") for f in takers[s.name]],
                     "default_for": [f[:-1] for f in takers[s.name] if f.endswith("*")]}
                    for s in sites])
        return 0
    rows = [[s.name, s.kind, str(s.in_channels), str(s.out_channels),
             "x".join(map(str, s.kernel_size)) or "-", str(s.stride),
             "x".join(map(str, s.output_shape)), human(s.params), human(s.macs),
             " ".join(takers[s.name])]
            for s in sites]
    print(table(rows, ["site", "kind", "in", "out", "kernel", "stride", "output", "params",
                       "MACs", "families (* = default site)"]))
    what = "site" if args.family == "all" else f"{args.family} site"
    print(f"{plural(len(sites), what)} in {args.model}")
    return 0


def _primary_choices(variant: Any) -> tuple:
    option = next((o for o in variant.options if o.name == variant.primary_option), None)
    return option.choices or () if option is not None else ()


def _defaults(variant: Any, candidates: list, options: dict) -> list:
    from autobuild.errors import AutobuildError as _Error

    try:
        return variant.default_sites(candidates, options)
    except _Error:  # e.g. volterra: no default site is small enough
        return []
