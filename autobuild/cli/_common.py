"""What the commands share: the parser class, argument groups, value parsers and printing."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from autobuild.errors import AutobuildError

__all__ = ["Parser", "add_conversion_arguments", "human", "model_from_args", "parse_options",
           "parse_size", "print_json", "print_summary", "table"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise AutobuildError(f"{self.prog}: {message}")


# ---- value parsers ----------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise AutobuildError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(size) != 3:
        raise AutobuildError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}")
    return size  # type: ignore[return-value]


def parse_options(pairs: Sequence[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutobuildError(f"--option takes name=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


# ---- the conversion flags (convert, train) ----------------------------------------------
def add_conversion_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """The flags that say which converted model to build (shared by convert and train)."""
    p.add_argument("model", nargs=None if model_required else "?",
                   help="baseline name (see `autobuild models`), or a saved run/plan directory")
    p.add_argument("--to", dest="family", help="family (see `autobuild variants`)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="family option, repeatable (e.g. type=ours)")
    p.add_argument("--sites", nargs="+", metavar="GLOB",
                   help="site name patterns (default: the family's default sites)")
    p.add_argument("--placement", metavar="FILE",
                   help="a YAML/JSON file mapping sites to choices (families may be mixed)")
    p.add_argument("--plan", help="build the model a plan file describes")
    p.add_argument("--init", choices=("scratch", "preserve"), default=None,
                   help="scratch (fresh weights) or preserve (start as the baseline's function)")
    p.add_argument("--num-classes", type=int, help="classifier outputs")
    p.add_argument("--input-size", type=parse_size, help="C,H,W used for shapes and counts")
    p.add_argument("--weights", help="baseline weights: a file, or torchvision weights name")


def model_from_args(args: argparse.Namespace, *, allow_baseline: bool = False
                    ) -> tuple[Any, Any]:
    """(model, analysis of its baseline) as the conversion flags describe.

    ``args.model`` may be a saved directory (plan + weights) as well as a baseline name.
    With ``allow_baseline`` and no ``--to``/``--placement``, the model is the unconverted
    baseline (an empty placement), which training uses for reference runs.
    """
    from autobuild.api import analyze, plan_baseline
    from autobuild.io import load, load_placement, load_plan
    from autobuild.rewrite import Analysis, Placement, plan_of

    converting = args.family or args.sites or args.option or args.placement
    if args.plan or (args.model and os.path.isdir(args.model)):
        if converting:
            raise AutobuildError("--to/--sites/--option/--placement cannot be combined with a "
                                 "plan or a saved run; edit the plan instead")
        if args.plan:
            plan = load_plan(args.plan)
            if args.model and args.model != plan.model:
                raise AutobuildError(f"--plan is for {plan.model!r}, not {args.model!r}")
            given = {"--num-classes": args.num_classes, "--input-size": args.input_size,
                     "--init": args.init, "--weights": args.weights}
            named = [flag for flag, value in given.items() if value is not None]
            if named:
                raise AutobuildError(f"{', '.join(named)} cannot be combined with --plan: the "
                                     "plan records them; edit the plan instead")
            analysis = Analysis(plan_baseline(plan))
            return analysis.build(plan.placement, plan.init), analysis
        model = load(args.model)
        return model, Analysis(plan_baseline(plan_of(model), device="meta"))
    if not args.model:
        raise AutobuildError("name a baseline model or a saved run directory")
    analysis = analyze(args.model, num_classes=args.num_classes, input_size=args.input_size,
                       weights=args.weights)
    init = args.init or "scratch"
    if args.placement:
        if args.family or args.sites or args.option:
            raise AutobuildError("--placement names every choice; it takes no --to/--sites/"
                                 "--option")
        return analysis.build(load_placement(args.placement), init), analysis
    if not args.family:
        if not allow_baseline:
            raise AutobuildError("--to FAMILY or --placement FILE is required (see "
                                 "`autobuild variants`)")
        if args.sites or args.option:
            raise AutobuildError("--sites/--option need --to FAMILY")
        return analysis.build(Placement(), init), analysis
    placement = analysis.select(args.family, args.sites, parse_options(args.option))
    return analysis.build(placement, init), analysis


# ---- printing ---------------------------------------------------------------------------
def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def print_summary(summary: dict[str, Any]) -> None:
    rows = [[s["site"], s["choice"], f"{s['before']} -> {s['after']}",
             f"{human(s['params']['before'])} -> {human(s['params']['after'])}",
             f"{human(s['macs']['before'])} -> {human(s['macs']['after'])}"]
            for s in summary["sites"]]
    if rows:
        print(table(rows, ["site", "choice", "module", "params", "MACs"]))
    n = len(rows)
    print(f"\n{summary['model']} -> {summary['placement']}, init={summary['init']}, "
          f"{n} site{'s' if n != 1 else ''}, counted on {summary['counted']} at "
          f"{'x'.join(map(str, summary['input_size']))}")
    for key in ("params", "macs", "flops"):
        b, a = summary[key]["before"], summary[key]["after"]
        print(f"  {key:6s} {human(b):>9s} -> {human(a):>9s}  ({a / max(b, 1):.2f}x)")
    if summary["max_abs_diff"] is not None:
        print(f"  max |output - baseline| = {summary['max_abs_diff']:.3g} "
              f"(largest baseline output {summary['max_abs_output']:.3g})")
