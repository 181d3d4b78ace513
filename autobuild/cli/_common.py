"""What the commands share: the parser class, typed flag values, argument groups, value
parsers and printing.

Every flag is declared with its type and bounds (:data:`POSITIVE_INT`, :data:`PATH`, ...,
and the training recipe's fields through :meth:`TrainConfig.flag_type`), so a bad value is
refused while the command line is parsed, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import Field, TypeAdapter, ValidationError

from autobuild.errors import (
    MAX_CLASSES,
    NAME_PATTERN,
    AutobuildError,
    integer_text_problem,
    schema_message,
)

__all__ = ["DEVICE", "NON_NEGATIVE_INT", "NUM_CLASSES", "PATH", "PORT", "POSITIVE_FLOAT",
           "POSITIVE_INT", "STUDY", "Parser", "recipe_value",
           "add_conversion_arguments", "flag_value", "human", "model_arg", "model_args_of",
           "model_from_args", "parse_options", "parse_size", "plural", "print_json",
           "print_summary", "status", "table"]


class Parser(argparse.ArgumentParser):
    """argparse, with abbreviated flags refused (``--epoch`` is not ``--epochs``: a typo must
    not turn into another flag) and every error one line that exits with code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    #: The command line being parsed (set by ``autobuild.cli.main``), for error hints.
    argv: ClassVar[list[str]] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._refuse_repeats(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def _refuse_repeats(self, args: list[str]) -> None:
        """A list flag given twice, or ``--to``: argparse would keep the last silently
        (``--sites A --sites B`` converted B only; ``--to a --to b`` is not two families).
        A single value given again replaces the first, as usual (``$COMMON --epochs 3``);
        flags that collect (``--option``, ``--import``) are meant to be repeated."""
        single = {flag: action for action in self._actions if action.option_strings
                  and (action.nargs in ("+", "*") or getattr(action, "once", False))
                  and not isinstance(action, argparse._AppendAction)
                  for flag in action.option_strings}
        seen: dict[argparse.Action, str] = {}
        for arg in args:
            if arg == "--" or arg in self._subparser_names():
                return  # (the rest belongs to a subcommand, or is not flags)
            action = single.get(arg.split("=", 1)[0] if arg.startswith("--") else arg)
            if action is None:
                continue
            flag = arg.split("=", 1)[0]
            if action in seen:
                alias = f" (as {seen[action]} before)" if seen[action] != flag else ""
                values = (f" with all its values ({flag} A B)" if action.nargs in ("+", "*")
                          else "")
                raise AutobuildError(f"argument {flag}: given twice{alias}; it is not "
                                     f"collected: give it once{values} (see `{self.prog} "
                                     "--help`)")
            seen[action] = flag

    def _subparser_names(self) -> set[str]:
        return {name for action in self._actions
                if isinstance(action, argparse._SubParsersAction) for name in action.choices}

    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        head, sep, tail = message.partition(": ")
        if sep and tail == "expected one argument" and head.startswith("argument --"):
            flags = head[len("argument "):].split("/")
            after = [self.argv[i + 1] for i, a in enumerate(self.argv[:-1]) if a in flags]
            if any(value.startswith("-") for value in after):
                # argparse took "--input-size -3,32,32"'s value for a flag
                message += f" (a value starting with '-' is written {flags[0]}=VALUE)"
        prog = self.prog
        if message.startswith("unrecognized arguments"):  # (the top parser says it for all)
            names = self._subparser_names()
            at = next((i for i, a in enumerate(self.argv) if a in names), None)
            first = message.partition(": ")[2].split(" ")[0]
            if at is not None and first in self.argv[at + 1:]:  # (after the command: its own)
                prog += f" {self.argv[at]}"
        raise AutobuildError(f"{message} (see `{prog} --help`)")


# ---- typed flag values -------------------------------------------------------------------
def flag_value(annotation: Any, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a flag's text as ``annotation`` (a pydantic type
    with its bounds) and says what is allowed when it is not."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            value = adapter.validate_strings(text)
        except ValidationError as exc:
            message = schema_message(exc, "", lambda loc: "").lstrip(": ")
            raise argparse.ArgumentTypeError(message) from None
        problem = integer_text_problem(text, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = name
    return parse


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


POSITIVE_INT = flag_value(Annotated[int, Field(ge=1)], "positive integer")
NON_NEGATIVE_INT = flag_value(Annotated[int, Field(ge=0)], "integer >= 0")
POSITIVE_FLOAT = flag_value(Annotated[float, Field(gt=0, allow_inf_nan=False)], "number > 0")
#: An image side (--image-size): a search budget's bounds (4096: a 3x4096x4096 batch of 64 is
#: 12 GB in float32 already; a mistyped 100000 tried to allocate 240 GB before it failed).
IMAGE_SIZE = flag_value(Annotated[int, Field(ge=8, le=4096)], "image size")
NUM_CLASSES = flag_value(Annotated[int, Field(ge=1, le=MAX_CLASSES)], "class count")
PORT = flag_value(Annotated[int, Field(ge=1, le=65535)], "port")
#: A file or directory named by the user: never empty (``--out ""`` is not "here").
PATH = _path
#: A study name (the name of its SQLite file and of its artifact directory too).
STUDY = flag_value(Annotated[str, Field(pattern=NAME_PATTERN)],
                   "study name")


def recipe_value(name: str) -> Callable[[str], Any]:
    """The ``type=`` of a flag that sets the training recipe's field ``name`` (checked by
    :class:`~autobuild.train.TrainConfig`'s schema)."""

    def parse(text: str) -> Any:
        from autobuild.train.config import TrainConfig

        return TrainConfig.flag_type(name)(text)

    parse.__name__ = name
    return parse


DEVICE = recipe_value("device")


# ---- value parsers ----------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    try:
        if not text.isascii():  # int() also reads other scripts' digits ('３')
            raise ValueError(text)
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"must be C,H,W of positive integers (e.g. 3,32,32), "
                                         f"got {text!r}")
    return size  # type: ignore[return-value]


def model_arg(text: str) -> tuple[str, Any]:
    """``--model-arg NAME=VALUE``, checked against the baseline builders' arguments
    (:class:`autobuild.models.ModelArgs`) while the command line is parsed."""
    from autobuild.models import check_model_args

    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE (e.g. drop_path_rate=0.1), got "
                                         f"{text!r}")
    try:
        return key, check_model_args({key: value}, strings=True, source="")[key]
    except AutobuildError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_args_of(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any] | None:
    """The ``--model-arg`` pairs as a mapping (None without any); a name given twice is
    refused."""
    if not pairs:
        return None
    args: dict[str, Any] = {}
    for key, value in pairs:
        if key in args:
            raise AutobuildError(f"--model-arg {key} is given twice")
        args[key] = value
    return args


def parse_options(pairs: Sequence[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AutobuildError(f"--option takes name=value, got {pair!r}")
        if key.strip() in options:
            raise AutobuildError(f"--option {key.strip()} is given twice")
        options[key.strip()] = value.strip()
    return options


# ---- the conversion flags (convert, train) ----------------------------------------------
def add_conversion_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """The flags that say which converted model to build (shared by convert and train)."""
    p.add_argument("model", nargs=None if model_required else "?",
                   help="baseline name (see `autobuild models`), or a saved run/plan directory")
    p.add_argument("--to", dest="family", help="family (see `autobuild variants`)"
                   ).once = True  # (given twice: refused, see Parser._refuse_repeats)
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="family option, repeatable (e.g. type=ours)")
    p.add_argument("--sites", nargs="+", metavar="GLOB",
                   help="site name patterns (default: the family's default sites)")
    p.add_argument("--placement", metavar="FILE", type=PATH,
                   help="a YAML/JSON file mapping sites to choices (families may be mixed)")
    p.add_argument("--plan", type=PATH, help="build the model a plan file describes")
    p.add_argument("--init", choices=("scratch", "preserve"), default=None,
                   help="scratch (fresh weights) or preserve (start as the baseline's function)")
    p.add_argument("--num-classes", type=NUM_CLASSES, help="classifier outputs")
    p.add_argument("--input-size", type=parse_size, help="C,H,W used for shapes and counts")
    p.add_argument("--weights", type=PATH,
                   help="baseline weights: a file, or torchvision weights name")
    p.add_argument("--model-arg", action="append", type=model_arg, metavar="NAME=VALUE",
                   help="baseline builder argument in [0, 1), repeatable, recorded in the "
                        "plan: drop_path_rate, drop_rate (timm), dropout, "
                        "stochastic_depth_prob (torchvision)")


def model_from_args(args: argparse.Namespace, *, allow_baseline: bool = False,
                    seed: int | None = None,
                    weights_name: str = "weights.safetensors") -> tuple[Any, Any]:
    """(model, analysis of its baseline) as the conversion flags describe; ``seed``: the
    baseline and then the new layers are each built right after seeding (as a search
    trial is, so that `train` reproduces it).

    ``args.model`` may be a saved directory (plan + ``weights_name``) as well as a baseline
    name.
    With ``allow_baseline`` and no ``--to``/``--placement``, the model is the unconverted
    baseline (an empty placement), which training uses for reference runs.
    """
    from autobuild.api import analyze, check_plan_leaves, plan_baseline
    from autobuild.io import load, load_placement, load_plan, plan_in
    from autobuild.rewrite import Analysis, Placement, plan_of

    converting = args.family or args.sites or args.option or args.placement
    if args.plan or (args.model and os.path.isdir(args.model)):
        if converting:
            raise AutobuildError("--to/--sites/--option/--placement cannot be combined with a "
                                 "plan or a saved run; edit the plan instead")
        given = {"--num-classes": args.num_classes, "--input-size": args.input_size,
                 "--init": args.init, "--weights": args.weights,
                 "--model-arg": args.model_arg}
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            what = "--plan" if args.plan else f"a saved model ({args.model})"
            raise AutobuildError(f"{', '.join(named)} cannot be combined with {what}: the "
                                 "plan records them; edit the plan instead")
        if args.plan:
            plan = load_plan(args.plan)
            if args.model and args.model != plan.model:
                raise AutobuildError(f"--plan is for {plan.model!r}, not {args.model!r}")
            base = plan_baseline(plan)
            check_plan_leaves(base)
            analysis = Analysis(base)
            return _build(analysis, plan.placement, plan.init, seed), analysis
        status(f"loading {args.model}")
        model = load(args.model, weights_name=weights_name)
        return model, Analysis(plan_baseline(plan_of(model), device="meta"))
    if not args.model:
        raise AutobuildError("name a baseline model or a saved run directory")
    status(f"analysing {args.model}")
    analysis = analyze(args.model, num_classes=args.num_classes, input_size=args.input_size,
                       weights=args.weights, model_args=model_args_of(args.model_arg))
    init = args.init or "scratch"
    if args.placement:
        if args.family or args.sites or args.option:
            raise AutobuildError("--placement names every choice; it takes no --to/--sites/"
                                 "--option")
        placement = load_placement(args.placement)
        plan = plan_in(args.placement)
        if plan is not None:  # a plan's placement names its own model's sites, in its init
            if plan.model != args.model:
                raise AutobuildError(f"--placement {args.placement}: a plan of {plan.model}, "
                                     f"not {args.model}: its sites are {plan.model}'s (give "
                                     "a placement file, or convert that model)")
            init = args.init or plan.init
        analysis.check_new(placement)
        return _build(analysis, placement, init, seed), analysis
    if not args.family:
        if not allow_baseline:
            raise AutobuildError("--to FAMILY or --placement FILE is required (see "
                                 "`autobuild variants`)")
        if args.sites or args.option:
            raise AutobuildError("--sites/--option need --to FAMILY")
        return _build(analysis, Placement(), init, seed), analysis
    placement = analysis.select(args.family, args.sites, parse_options(args.option))
    return _build(analysis, placement, init, seed), analysis


def _build(analysis: Any, placement: Any, init: str, seed: int | None = None) -> Any:
    """Say what is about to be built (predicted from the analysis, nothing allocated), then
    build it; an absurd size is refused by the analysis before allocating."""
    cost = analysis.cost(placement)
    status(f"building {analysis.baseline.name} -> {placement.summary()}: "
           f"{human(cost.params)} params, {human(cost.macs)} MACs per image")
    return analysis.build(placement, init, seed=seed)


# ---- printing ---------------------------------------------------------------------------
def status(message: str) -> None:
    """A progress line on stderr for a person watching (a terminal, or AUTOBUILD_PROGRESS=1):
    logs and pipes get only results and errors."""
    if os.environ.get("AUTOBUILD_PROGRESS", "") not in ("", "0") or sys.stderr.isatty():
        print(f"autobuild: {message}", file=sys.stderr, flush=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 site``, ``2 sites``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


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
    args = ", ".join(f"{k}={v}" for k, v in summary.get("model_args", {}).items())
    print(f"\n{summary['model']}{f' ({args})' if args else ''} -> {summary['placement']}, "
          f"init={summary['init']}, "
          f"{plural(len(rows), 'site')}, counted on {summary['counted']} at "
          f"{'x'.join(map(str, summary['input_size']))}")
    for key in ("params", "macs", "flops"):
        b, a = summary[key]["before"], summary[key]["after"]
        print(f"  {key:6s} {human(b):>9s} -> {human(a):>9s}  ({a / max(b, 1):.2f}x)")
    if summary["max_abs_diff"] is not None:
        print(f"  max |output - baseline| = {summary['max_abs_diff']:.3g} "
              f"(largest baseline output {summary['max_abs_output']:.3g})")
    elif summary.get("max_abs_diff_note"):
        print(f"  max |output - baseline|: {summary['max_abs_diff_note']}")
