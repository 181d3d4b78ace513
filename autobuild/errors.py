"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["MAX_CLASSES", "MAX_SEED", "NAME_PATTERN", "AutobuildError", "InfeasiblePlacement",
           "InvalidType", "InvalidValue", "Terminated", "brief", "in_context", "check_input_size",
           "check_num_classes", "check_positive_int", "check_seed", "integer_text_problem",
           "schema_error", "schema_message", "unknown_name", "without_type"]

#: What a study may be called (also the name of its SQLite file and artifact folder).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
#: Patterns said in words in error messages.
_PATTERN_WORDS = {NAME_PATTERN: "must be 1 to 100 ASCII letters, digits, '_', '.' or '-', "
                                "starting with a letter or digit"}


class AutobuildError(Exception):
    """Bad input: unknown name, invalid option, corrupt file, untraceable model...

    The message is complete on one line and says how to fix the problem.
    """

    exit_code = 2


class InvalidValue(AutobuildError, ValueError):
    """An argument of the right type with a value outside what is allowed."""


class InvalidType(AutobuildError, TypeError):
    """An argument of the wrong type (never converted silently: 2.5 is not an integer)."""


class InfeasiblePlacement(AutobuildError, ValueError):
    """A placement that cannot be built: overlapping or conflicting choices, a site the
    baseline does not have, or a site a family refuses. Raised before anything is built."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting a worker): handled like Ctrl-C, exit code 143."""


def without_type(line: str) -> str | None:
    """The message of a traceback's last line, ``autobuild.errors.AutobuildError: msg``
    (how a data-loader worker's error arrives): ``msg``; None for a line that does not start
    with an error type."""
    head, sep, rest = line.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Placement")) else None


def in_context(exc: AutobuildError, message: str) -> AutobuildError:
    """``exc`` again, of its own class where that class takes a message (a family of one's
    own may define one that does not), with ``message`` and its exit code."""
    try:
        again = type(exc)(message)
    except TypeError:
        again = AutobuildError(message)
    again.exit_code = exc.exit_code
    return again


def brief(exc: BaseException, limit: int = 300) -> str:
    """A library's error on one line: its first line and, where that line only heads a list
    (torch's ``load_state_dict``: "Error(s) in loading state_dict for ResNet:"), the first
    item of the list and how many follow; at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}" + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


_INTEGER_TEXT = re.compile(r"\s*[+-]?\d[\d_]*\s*")


def integer_text_problem(text: str, value: Any) -> str:
    """Why the flag text ``text`` that parsed as ``value`` is no integer ("" if fine):
    pydantic reads "1.0" as the integer 1, and a value is never converted across types."""
    if isinstance(value, int) and not isinstance(value, bool) and \
            not _INTEGER_TEXT.fullmatch(text):
        return f"must be an integer, got {text!r}"
    return ""


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1 (a bool or 2.0 is refused, not converted)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidType(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise InvalidValue(f"{name} must be a positive integer, got {value!r}")
    return value


#: The most classes a classifier may have (ImageNet-21k has 21,841; 10^7 classes of a
#: 2048-wide head are 82 GB of float32 weights already).
MAX_CLASSES = 10**7


def check_num_classes(value: Any, name: str = "num_classes") -> int:
    """``value`` if it is an int in 1..:data:`MAX_CLASSES` (a bool or 2.0 is refused)."""
    check_positive_int(value, name)
    if value > MAX_CLASSES:
        raise InvalidValue(f"{name} must be at most {MAX_CLASSES:,}, got {value!r}")
    return value


#: The largest seed: numpy's are 32-bit and every DDP rank adds its rank (room for 65536).
MAX_SEED = 2**32 - 1 - 65536


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` if it is an int in 0..:data:`MAX_SEED` (a bool or 2.5 is refused, not
    converted), as ``train --seed`` takes it."""
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # (numpy's too)
        raise InvalidType(f"{name} must be an integer in 0..{MAX_SEED}, got {value!r}")
    if not 0 <= int(value) <= MAX_SEED:
        raise InvalidValue(f"{name} must be an integer in 0..{MAX_SEED}, got {value!r}")
    return int(value)


def check_input_size(size: Any, name: str = "input_size") -> tuple[int, int, int]:
    """``size`` as a (C, H, W) tuple of positive ints, or an error naming ``name``."""
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence):
        raise InvalidType(f"{name} must be (C, H, W) integers, got {size!r}")
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise InvalidType(f"{name} must be (C, H, W) integers, got {tuple(size)!r}")
    if min(size) <= 0:
        raise InvalidValue(f"{name} must be C,H,W with positive values, got {tuple(size)}")
    return tuple(size)  # type: ignore[return-value]


def unknown_name(what: str, name: str, valid: Iterable[str], hint: str = "", *,
                 shown: int | None = None) -> AutobuildError:
    """An error for an unknown ``what`` that lists the valid names, closest ones first
    (at most ``shown`` of them, with their count, when there are too many to list)."""
    valid = sorted(valid)
    close = _closest(name, valid)
    msg = f"unknown {what} {name!r}"
    if close:
        msg += f" (did you mean {', '.join(close)}?)"
    if shown is not None and len(valid) > shown:
        msg += f"; {len(valid)} valid names, e.g. {', '.join(valid[:shown])}"
    else:
        msg += f"; valid: {', '.join(valid)}"
    if hint:
        msg += f" ({hint})"
    return InvalidValue(msg)


def _closest(name: Any, valid: list[str]) -> list[str]:
    """Up to three valid names close to ``name``: the same but for case, then those that
    add words or digits to it (``densenet``: ``densenet121``; ``resnet20``:
    ``cifar_resnet20``), then similar ones."""
    if not isinstance(name, str) or not name.strip():
        return []
    key = name.strip().lower()
    same = [v for v in valid if v.lower() == key]
    longer = [v for v in valid if len(key) > 2 and re.match(rf"{re.escape(key)}[_\d]",
                                                            v.lower())]
    longer += [v for v in valid if len(key) > 2
               and f"_{key}_" in f"_{v.lower().replace(':', '_')}_"]
    similar = difflib.get_close_matches(key, [v.lower() for v in valid], n=3, cutoff=0.6)
    lowered = {v.lower(): v for v in valid}
    found = same + longer + [lowered[v] for v in similar]
    return list(dict.fromkeys(found))[:3]


def schema_message(exc: Any, source: str = "",
                   name: Callable[[tuple[Any, ...]], str] | None = None) -> str:
    """One line for a pydantic ``ValidationError``: its first error, naming the offending
    key (``name`` turns a location into what the user typed, e.g. ``--lr``) and the value.

    Takes the exception duck-typed so that modules which never import pydantic can use it.
    """
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = name(loc) if name else ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{source}{key}: unknown key"
    if kind == "missing":
        return f"{source}{key}: is required"
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg.replace("Input should be", "must be").replace("Input should have", "must have")
    msg = msg.replace("String should", "must").replace("List should", "must")
    ctx = err.get("ctx") or {}
    shown = err.get("input")
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return f"{source}{key}: must not be empty"
    if kind == "string_pattern_mismatch":
        msg = _PATTERN_WORDS.get(ctx.get("pattern"), msg)
    elif kind in _BOUNDS and _not_finite(shown):  # "greater than 0" would mislead for NaN
        msg = "must be a finite number"
    named = kind == "value_error" and _names_value(msg, shown)  # (a validator's own text)
    nested = isinstance(shown, dict) or (  # (a list of mappings: the whole section)
        isinstance(shown, list) and any(isinstance(v, dict) for v in shown))
    got = "" if nested or named else f", got {shown!r}"
    return f"{source}{key}: {msg}{got}"


def _names_value(msg: str, shown: Any) -> bool:
    """Whether a validator's own message already quotes the value (or the list item at
    fault): ``unknown sampler 'cmaes'; valid: ...`` needs no ``, got 'cmaes'``."""
    items = shown if isinstance(shown, list) else [shown]
    return any(repr(v) in msg for v in items if isinstance(v, str))


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def _not_finite(value: Any) -> bool:
    """NaN or an infinity, as a float or as the text of one ('nan', '-inf')."""
    try:
        return isinstance(value, (str, float)) and not math.isfinite(float(value))
    except ValueError:
        return False


def schema_error(exc: Any, source: str = "",
                 name: Callable[[tuple[Any, ...]], str] | None = None) -> AutobuildError:
    """:func:`schema_message` as an :class:`InvalidType` (a value of the wrong type) or an
    :class:`InvalidValue` (out of bounds, not one of the choices, an unknown key)."""
    kind = exc.errors()[0]["type"]
    wrong_type = kind.endswith(("_type", "_parsing")) or kind == "int_from_float"
    return (InvalidType if wrong_type else InvalidValue)(schema_message(exc, source, name))
