"""The ``autobuild`` command: thin wiring from arguments to the Python API.

Every bad input ends as one line on stderr and exit code 2 (``AUTOBUILD_DEBUG=1`` shows the
traceback); a diverged training run exits with 3.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from autobuild.errors import AutobuildError

__all__ = ["add_conversion_arguments", "converted_from_args", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise AutobuildError(f"{self.prog}: {message}")


# ---- shared argument groups -------------------------------------------------------------
def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise AutobuildError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(size) != 3:
        raise AutobuildError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}")
    return size  # type: ignore[return-value]


def _parse_options(pairs: Sequence[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutobuildError(f"--option takes name=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def add_conversion_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """The flags that say which converted model to build (shared by convert and train)."""
    p.add_argument("model", nargs=None if model_required else "?",
                   help="baseline name (see `autobuild models`), or a saved run/plan directory")
    p.add_argument("--to", dest="family", help="family (see `autobuild variants`)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="family option, repeatable (e.g. type=ours)")
    p.add_argument("--sites", nargs="+", metavar="GLOB",
                   help="site name patterns (default: the family's default sites)")
    p.add_argument("--plan", help="build the model a plan file describes")
    p.add_argument("--init", choices=("scratch", "preserve"), default=None,
                   help="scratch (fresh weights) or preserve (start as the baseline's function)")
    p.add_argument("--num-classes", type=int, help="classifier outputs")
    p.add_argument("--input-size", type=_parse_size, help="C,H,W used for shapes and counts")
    p.add_argument("--weights", help="baseline weights: a file, or torchvision weights name")


def converted_from_args(args: argparse.Namespace, *, allow_baseline: bool = False) -> Any:
    """Build the :class:`~autobuild.rewrite.Converted` the conversion flags describe.

    ``args.model`` may be a saved directory (plan + weights) as well as a baseline name.
    With ``allow_baseline`` and no ``--to``, the result is the unconverted baseline (a plan
    with no conversions), which training uses for reference runs.
    """
    from autobuild.io import load
    from autobuild.rewrite import Converted, Plan, apply_plan, convert_model, resolve_baseline

    if args.plan or (args.model and os.path.isdir(args.model)):
        if args.family or args.sites or args.option:
            raise AutobuildError("--to/--sites/--option cannot be combined with a plan or a "
                                 "saved run; edit the plan instead")
        if args.plan:
            plan = Plan.load(args.plan)
            if args.model and args.model != plan.model:
                raise AutobuildError(f"--plan is for {plan.model!r}, not {args.model!r}")
            return apply_plan(plan)
        model = load(args.model)
        plan = model._autobuild_plan
        base = resolve_baseline(plan.model, num_classes=plan.num_classes,
                                input_size=plan.input_size)
        return Converted(model, plan, base, [], [])
    if not args.model:
        raise AutobuildError("name a baseline model or a saved run directory")
    base = resolve_baseline(args.model, num_classes=args.num_classes, input_size=args.input_size,
                            weights=args.weights)
    if not args.family:
        if not allow_baseline:
            raise AutobuildError("--to FAMILY is required (see `autobuild variants`)")
        if args.sites or args.option:
            raise AutobuildError("--sites/--option need --to FAMILY")
        plan = Plan(base.name, [], "scratch", base.num_classes, base.input_size, base.weights)
        model = copy.deepcopy(base.module)
        model._autobuild_plan = plan
        return Converted(model, plan, base, [], [])
    return convert_model(base, args.family, sites=args.sites,
                         options=_parse_options(args.option), init=args.init or "scratch")


# ---- output helpers ---------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- commands ---------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    from autobuild.models import list_models

    entries = list_models()
    if args.json:
        _print_json([{"name": e.name, "source": e.source, "input_size": e.input_size,
                      "num_classes": e.num_classes, "description": e.description}
                     for e in entries])
        return 0
    for e in entries:
        size = "x".join(map(str, e.input_size))
        print(f"{e.name:34s} {e.source:12s} {size:10s} {e.description}")
    print("timm models: timm:<name> (needs the 'timm' extra)")
    return 0


def _cmd_variants(args: argparse.Namespace) -> int:
    from autobuild.variants import list_variants

    variants = [v.describe() for v in list_variants()]
    if args.json:
        _print_json(variants)
        return 0
    for v in variants:
        print(f"{v['name']}: {v['summary']}")
        print(f"  sites: {', '.join(v['site_kinds'])}; init: {', '.join(v['inits'])}")
        print(f"  paper: {v['paper']}")
        for o in v["options"]:
            choices = f" [{'|'.join(map(str, o['choices']))}]" if o["choices"] else ""
            print(f"  --option {o['name']}={o['default']}{choices}  {o['help']}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from autobuild.rewrite import candidate_sites, resolve_baseline

    base = resolve_baseline(args.model, num_classes=args.num_classes, input_size=args.input_size)
    sites = candidate_sites(base, args.family, _parse_options(args.option))
    if args.json:
        _print_json([s.to_dict() for s in sites])
        return 0
    rows = [[s.name, s.kind, str(s.in_channels), str(s.out_channels),
             "x".join(map(str, s.kernel_size)) or "-", str(s.stride),
             "x".join(map(str, s.output_shape)), _human(s.params), _human(s.macs)]
            for s in sites]
    print(_table(rows, ["site", "kind", "in", "out", "kernel", "stride", "output", "params",
                        "MACs"]))
    print(f"{len(sites)} {args.family} sites in {args.model}")
    return 0


def summarize(converted: Any, *, compare: bool = True) -> dict[str, Any]:
    """Counts before/after, per converted site, and (with ``compare`` and init=preserve)
    the largest output difference to the baseline."""

    from autobuild.counting import count

    plan, base = converted.plan, converted.baseline
    root = base.root
    model_root = converted.model.get_submodule(root) if root else converted.model
    base_root = base.module.get_submodule(root) if root else base.module
    before, after = count(base_root, base.input_size), count(model_root, base.input_size)
    local = (lambda name: name[len(root) + 1:]) if root else (lambda name: name)
    sites = []
    for change in converted.changes:
        name = local(change.site.split("#")[0]) if change.site != "network" else ""
        sites.append({"site": change.site, "family": change.family, "before": change.before,
                      "after": change.after,
                      "params": {"before": change.params_before, "after": change.params_after},
                      "macs": {"before": before.module_macs.get(name, 0),
                               "after": after.module_macs.get(name, 0)}})
    result = {
        "model": plan.model,
        "family": plan.family,
        "options": plan.conversions[0].options if len(plan.conversions) == 1 else {},
        "init": plan.init,
        "input_size": list(base.input_size),
        "counted": root or "model",
        "sites": sites,
        "params": {"before": before.params, "after": after.params},
        "macs": {"before": before.macs, "after": after.macs},
        "flops": {"before": before.flops, "after": after.flops},
        "max_abs_diff": None,
    }
    if plan.init == "preserve" and compare:
        result["max_abs_diff"], result["max_abs_output"] = _output_difference(
            base_root, model_root, base.input_size)
    return result


def _flat(y: Any) -> Any:
    import torch

    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return torch.cat([t.flatten() for t in y])
    return y.flatten()


def print_summary(summary: dict[str, Any]) -> None:
    rows = [[s["site"], f"{s['before']} -> {s['after']}",
             f"{_human(s['params']['before'])} -> {_human(s['params']['after'])}",
             f"{_human(s['macs']['before'])} -> {_human(s['macs']['after'])}"]
            for s in summary["sites"]]
    if rows:
        print(_table(rows, ["site", "module", "params", "MACs"]))
    opts = ", ".join(f"{k}={v}" for k, v in summary["options"].items())
    print(f"\n{summary['model']} -> {summary['family']} ({opts}), init={summary['init']}, "
          f"{len(rows)} sites, counted on {summary['counted']} at "
          f"{'x'.join(map(str, summary['input_size']))}")
    for key in ("params", "macs", "flops"):
        b, a = summary[key]["before"], summary[key]["after"]
        print(f"  {key:6s} {_human(b):>9s} -> {_human(a):>9s}  ({a / max(b, 1):.2f}x)")
    if summary["max_abs_diff"] is not None:
        print(f"  max |output - baseline| = {summary['max_abs_diff']:.3g} "
              f"(largest baseline output {summary['max_abs_output']:.3g})")


def _cmd_convert(args: argparse.Namespace) -> int:
    from autobuild.io import ensure_writable_dir, save

    if args.out:  # refuse before the (possibly slow) conversion
        ensure_writable_dir(args.out, force=args.force)
    converted = converted_from_args(args)
    summary = summarize(converted)
    if args.out:
        save(converted.model, args.out, force=True)
        summary["out"] = args.out
    if args.json:
        _print_json(summary)
    else:
        print_summary(summary)
        if args.out:
            print(f"saved plan + weights to {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from autobuild.io import load
    from autobuild.rewrite import apply_plan

    model = load(args.run_dir)
    plan = model._autobuild_plan
    # The plan rebuilt from the baseline gives the per-site record; weights come from disk.
    # The preservation error is only meaningful against the baseline's own weights.
    converted = apply_plan(plan, load_baseline_weights=bool(plan.weights))
    converted.model = model
    summary = summarize(converted, compare=bool(plan.weights))
    summary["run"] = args.run_dir
    if args.json:
        _print_json(summary)
    else:
        print_summary(summary)
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    from autobuild.io import ensure_writable_dir, load, save
    from autobuild.variants.dirac import fold

    ensure_writable_dir(args.out, force=args.force)
    model = load(args.run_dir)
    folded = fold(model)
    diff = _output_difference(model, folded, model._autobuild_plan.input_size)
    save(folded, args.out, force=True)
    result = {"run": args.run_dir, "out": args.out, "max_abs_diff": diff[0],
              "max_abs_output": diff[1]}
    if args.json:
        _print_json(result)
    else:
        print(f"folded {args.run_dir} -> {args.out}: max |folded - unfolded| = {diff[0]:.3g} "
              f"(largest output {diff[1]:.3g})")
    return 0


def _output_difference(reference: Any, other: Any, input_size: Sequence[int]
                       ) -> tuple[float, float]:
    """(max |other - reference|, max |reference|) on a fixed random input, in eval mode."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(2, *input_size)
    reference.eval()
    other.eval()
    with torch.no_grad():
        y0, y1 = _flat(reference(x)), _flat(other(x))
    return float((y0 - y1).abs().max()), float(y0.abs().max())


def _cmd_symmetry(args: argparse.Namespace) -> int:
    from autobuild.io import load
    from autobuild.variants.multiplicative import check_symmetry

    model = load(args.run_dir)
    result = check_symmetry(model, seed=args.seed)
    if args.json:
        _print_json(result)
    else:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autobuild", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list baselines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_models)

    p = sub.add_parser("variants", help="list families, their options and site kinds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_variants)

    p = sub.add_parser("sites", help="list the candidate sites of a family in a baseline")
    p.add_argument("model")
    p.add_argument("--to", dest="family", required=True)
    p.add_argument("--option", action="append", metavar="NAME=VALUE")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--input-size", type=_parse_size)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_sites)

    p = sub.add_parser("convert", help="convert a baseline; print counts; optionally save")
    add_conversion_arguments(p, model_required=False)
    p.add_argument("--out", help="directory for plan.yaml + weights.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("inspect", help="load a saved model and print its summary")
    p.add_argument("run_dir", metavar="RUN", help="a saved model directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("fold", help="fold Dirac convs and their BN into plain convs")
    p.add_argument("run_dir", metavar="RUN", help="a saved model directory")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_fold)

    p = sub.add_parser("symmetry", help="apply QLNet's orthogonal symmetry; print the change")
    p.add_argument("run_dir", metavar="RUN", help="a saved model directory")
    p.add_argument("--check", action="store_true",
                   help="compare outputs before and after (the default and only action)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_symmetry)

    try:
        from autobuild.train import commands as train_commands
    except ImportError:  # pragma: no cover - training is part of the package
        train_commands = None
    if train_commands is not None:
        train_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 3 diverged training)."""
    debug = os.environ.get("AUTOBUILD_DEBUG") not in (None, "", "0")
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except AutobuildError as exc:
        if debug:
            traceback.print_exc()
        print(f"autobuild: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autobuild: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
