"""The ``autobuild`` command: one module per command, each with ``add_parser(sub)`` and
``run(args) -> int``; argument parsing and printing only, the work is the library's.

Exit codes (docs/cli.md): 0 success; 2 bad input or a refused action (one line on stderr,
``autobuild: error: ...``, nothing written); 3 a diverged training run; 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM); 1 only for a bug (a traceback). ``--debug`` or
``AUTOBUILD_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

from autobuild.cli._common import Parser
from autobuild.errors import AutobuildError, Terminated, without_type

__all__ = ["COMMANDS", "build_parser", "import_user_module", "main", "one_line"]

#: The command modules, in the order ``autobuild --help`` lists them.
COMMANDS = ("models", "variants", "sites", "convert", "inspect", "fold", "symmetry", "train",
            "evaluate", "analyze", "importance", "search", "worker", "status", "report",
            "export", "dashboard")


def build_parser() -> argparse.ArgumentParser:
    from autobuild import __version__

    parser = Parser(prog="autobuild",
                    description="Convert vision networks into quadratic, multiplicative, "
                                "parameter-free, PDE-Global or Dirac variants; count, train "
                                "and search them.",
                    epilog="exit codes: 0 success, 2 bad input or refused action, 3 diverged "
                           "training, 130 interrupted, 143 terminated, 1 a bug (docs/cli.md)")
    parser.add_argument("--version", action="version", version=f"autobuild {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of any error (also AUTOBUILD_DEBUG=1)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import a module (name or .py path) that "
                        "registers families or models first; repeatable")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND",
                                help="one of these (COMMAND --help for its flags)")
    for name in COMMANDS:
        importlib.import_module(f"autobuild.cli.{name}").add_parser(sub)
    return parser


#: The files of the modules --import loaded (a package: its folder): an exception raised
#: in their code is theirs, not a bug of autobuild's.
_USER_CODE: list[str] = []


def import_user_module(spec: str) -> None:
    """Import a module by dotted name or by ``.py`` path (a user's families or models)."""
    import importlib.util

    allowed = "give a .py file or a module name (package.module)"
    if not spec.strip():
        raise AutobuildError(f"--import is empty; {allowed}")
    try:
        if spec.endswith(".py") or os.sep in spec:
            if os.path.isdir(spec):
                raise AutobuildError(f"--import {spec}: is a directory; {allowed} (a package "
                                     "by its name, with its parent folder on PYTHONPATH)")
            if not os.path.isfile(spec):
                raise AutobuildError(f"--import {spec}: no such file")
            if not spec.endswith(".py"):
                raise AutobuildError(f"--import {spec}: not a .py file; {allowed}")
            name = os.path.splitext(os.path.basename(spec))[0]
            module_spec = importlib.util.spec_from_file_location(name, spec)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            _USER_CODE.append(os.path.realpath(spec))
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
            where = getattr(module, "__file__", None)
            if where:
                _USER_CODE.append(os.path.realpath(
                    os.path.dirname(where) if where.endswith("__init__.py") else where))
    except AutobuildError:
        raise
    except SystemExit as exc:  # the user's module ended the process
        raise AutobuildError(f"--import {spec} failed: it called sys.exit({exc.code!r})"
                             ) from exc
    except Exception as exc:  # the user's code failed to import
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == spec and os.path.exists(spec):
            hint = (f" (the {'folder' if os.path.isdir(spec) else 'file'} {spec!r} here is "
                    f"not an importable module; {allowed})")
        raise AutobuildError(f"--import {spec} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}") from exc


def _raised_in_user_code(exc: BaseException) -> str | None:
    """``FILE:LINE`` of the innermost frame of ``exc``'s traceback that runs code --import
    loaded (None if none does)."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.realpath(frame.filename)
        if any(path == code or path.startswith(code + os.sep) for code in _USER_CODE):
            found = f"{frame.filename}:{frame.lineno}"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("AUTOBUILD_DEBUG") not in (None, "", "0") or "--debug" in argv
    try:
        Parser.argv = argv  # (for an error's hint; reset once parsed)
        try:
            args = build_parser().parse_args(argv)
        finally:
            Parser.argv = []
        # What a user's module prints at import time goes to stderr: stdout is the
        # command's output (--json must stay parseable).
        with contextlib.redirect_stdout(sys.stderr):
            for spec in args.imports:
                import_user_module(spec)
        with sigterm_raises() as received:
            try:
                code = int(args.run(args) or 0)
            except KeyboardInterrupt:
                if received:  # (a command that caught Terminated and raised another)
                    raise Terminated() from None
                raise
        if received:  # a command that caught it and returned (the dashboard's server does)
            raise Terminated()
        return code
    except AutobuildError as exc:
        if debug:
            traceback.print_exc()
        print(f"autobuild: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"autobuild: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:
        # The reader went away (`autobuild models | head -1`): what it wanted, it has.
        # Python would complain again when flushing stdout at exit: point it at nothing.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: the traceback is what a report needs
        where = _raised_in_user_code(exc)
        if where:  # a family or model of the user's: their bug, named, not ours
            if debug:
                traceback.print_exc()
            print(f"autobuild: error: {type(exc).__name__}: {one_line(exc)} (raised in "
                  f"code --import loaded, at {where}; --debug shows the traceback)",
                  file=sys.stderr)
            return 2
        traceback.print_exc()
        print("autobuild: internal error (a bug): please report it with the traceback above",
              file=sys.stderr)
        return 1


def _ignore(signum: int, frame: object) -> None:
    """A signal handler that does nothing."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[list[int]]:
    """SIGTERM (a scheduler, ``kill``) raises :class:`Terminated`, as Ctrl-C raises
    KeyboardInterrupt: a training run then records how it stopped (``train.yaml``) and the
    command exits 143, instead of dying with ``status: running`` on disk. Only where the
    handler is still the default, and only in the main thread (the one that can set it).
    Yields the signals received: a command that caught it and returned exits 143 too."""
    pid = os.getpid()

    def terminated(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked child that kept the handler: end as on Ctrl-C
            raise KeyboardInterrupt
        received.append(signum)
        # A scheduler signals the whole process group: the data-loader workers die of it
        # too, and torch's SIGCHLD handler would then raise "worker killed by signal" in
        # the middle of the unwinding (the run record half written, exit 1). Python runs
        # pending handlers in signal order, so SIGTERM's (15) comes before SIGCHLD's (17).
        # It stays off: workers go on dying while the process ends (a caller of main()
        # that goes on still detects failed workers, by polling). A Python no-op, not
        # SIG_DFL: a SIGCHLD already pending would print "Signal 17 ignored due to race
        # condition".
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, _ignore)
        raise Terminated()

    previous, received = None, []  # type: ignore[var-annotated]
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(exc: BaseException) -> str:
    """An error's message on one line. A worker process's error (a DataLoader's) arrives
    wrapped with the worker's traceback: its last line is the message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch.fx's interpreter appends where in the graph it was ("While executing %node ...",
    # the traceback, a tlparse hint): the user's message is what comes before.
    fx_note = next((i for i, ln in enumerate(lines) if ln.startswith("While executing ")), None)
    if fx_note:
        lines = lines[:fx_note]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    rest = without_type(lines[-1])
    return rest if rest is not None else " ".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
