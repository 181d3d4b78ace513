"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["AutobuildError", "InfeasiblePlacement", "Terminated", "unknown_name"]


class AutobuildError(Exception):
    """Bad input: unknown name, invalid option, corrupt file, untraceable model...

    The message is complete on one line and says how to fix the problem.
    """

    exit_code = 2


class InfeasiblePlacement(AutobuildError, ValueError):
    """A placement that cannot be built: overlapping or conflicting choices, a site the
    baseline does not have, or a site a family refuses. Raised before anything is built."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting a worker): handled like Ctrl-C, exit code 143."""


def unknown_name(what: str, name: str, valid: Iterable[str], hint: str = "") -> AutobuildError:
    """An error for an unknown ``what`` that lists the valid names, closest ones first."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    msg = f"unknown {what} {name!r}"
    if close:
        msg += f" (did you mean {', '.join(close)}?)"
    msg += f"; valid: {', '.join(valid)}"
    if hint:
        msg += f" ({hint})"
    return AutobuildError(msg)
