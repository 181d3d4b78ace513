"""The ``autobuild`` command: one module per command, each with ``add_parser(sub)`` and
``run(args) -> int``; argument parsing and printing only, the work is the library's.

Exit codes: 0 success, 2 bad input (one line on stderr; ``AUTOBUILD_DEBUG=1`` shows the
traceback), 3 a diverged training run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from autobuild.cli._common import Parser
from autobuild.errors import AutobuildError

__all__ = ["COMMANDS", "build_parser", "main"]

#: The command modules, in the order ``autobuild --help`` lists them.
COMMANDS = ("models", "variants", "sites", "convert", "inspect", "fold", "symmetry", "train",
            "evaluate", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="autobuild",
                    description="Convert vision networks into quadratic, multiplicative, "
                                "parameter-free, PDE-Global or Dirac variants; count, train "
                                "and search them.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"autobuild.cli.{name}").add_parser(sub)
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
