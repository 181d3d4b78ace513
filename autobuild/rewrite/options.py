"""A family's typed options: ``--option name=value`` from the CLI, YAML or Python, converted
to one canonical value or refused with a message naming the option, its family and what is
allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobuild.errors import AutobuildError, InvalidType, InvalidValue

__all__ = ["Option"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One ``--option name=value`` of a family: its type, default, allowed values or bounds.

    Strings (from the CLI or YAML) are converted; a value of the wrong type is refused,
    never reinterpreted (``K=2.5`` for an int option is an error, not 2). Options whose
    value decides how much is built (a step count, a width) state a ``max``: an absurd value
    is refused before anything is allocated. ``specials`` are named values accepted as they
    are besides those of ``type`` (``expansion=qlnet`` next to ``expansion=2.5``).
    """

    name: str
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    type: type = str
    min: float | None = None
    max: float | None = None
    #: False: the value must be strictly above ``min`` (a time step, a scale).
    min_inclusive: bool = True
    specials: tuple[Any, ...] = ()
    #: Other spellings of a choice, (spelling, choice): the float 1e-5 arrives as "1e-05".
    aliases: tuple[tuple[Any, Any], ...] = ()
    #: Validates a converted value and returns its one canonical spelling (raises
    #: AutobuildError), so that two spellings of one network are one placement.
    normalize: Callable[[Any], Any] | None = None

    def parse(self, value: Any, family: str) -> Any:
        if self.specials and isinstance(value, str) and value in self.specials:
            return value
        value = self._convert(value, family)
        value = dict(self.aliases).get(value, value)
        if self.normalize is not None:
            try:
                value = self.normalize(value)
            except AutobuildError as e:
                raise InvalidValue(f"option {self.name} of {family}: {e}") from None
        if self.choices is not None and value not in self.choices:
            raise InvalidValue(f"option {self.name}={value!r} of {family} is not valid; valid:"
                               f" {', '.join(map(str, self.choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = self.min is not None and (value < self.min or (
                not self.min_inclusive and value == self.min))
            high = self.max is not None and value > self.max
            finite = not isinstance(value, float) or math.isfinite(value)
            if low or high or not finite:
                also = "".join(f" or {s}" for s in self.specials)
                bounds = self.bounds()
                if not finite and bounds != "finite":  # inf > 0, but not a number to use
                    bounds = f"a finite number {bounds}"
                raise InvalidValue(f"option {self.name}={value!r} of {family} must be "
                                   f"{bounds}{also}")
        return value

    def bounds(self) -> str:
        """The allowed range in words ("finite" when unbounded)."""
        low = ">=" if self.min_inclusive else ">"
        if self.min is not None and self.max is not None:
            return f"in {'[' if self.min_inclusive else '('}{self.min}, {self.max}]"
        if self.min is not None:
            return f"{low} {self.min}"
        if self.max is not None:
            return f"<= {self.max}"
        return "finite"

    def _convert(self, value: Any, family: str) -> Any:
        kind = {bool: "true or false (or yes/no, on/off, 1/0)", int: "an integer",
                float: "a number", str: "a string"}.get(self.type, f"a {self.type.__name__}")
        shown = value if isinstance(value, str) else repr(value)
        if self.specials:
            kind += " or " + " or ".join(map(str, self.specials))
        bad = InvalidType(f"option {self.name}={shown} of {family} must be {kind}")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):  # YAML's `folded: 1`, as "1"
                return bool(value)
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise bad
        if self.type is int:
            if isinstance(value, bool):
                raise bad
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    raise bad from None
            raise bad
        if self.type is float:
            if isinstance(value, bool):
                raise bad
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value.strip())
                except ValueError:
                    raise bad from None
            raise bad
        if self.type is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise bad
        try:
            return self.type(value)
        except (TypeError, ValueError):
            raise bad from None
