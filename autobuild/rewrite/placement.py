"""Placements: which sites get which family (and options). Everything else keeps the baseline.

A placement is canonical: sites sorted, every option of every choice filled in with its
default, ``keep`` dropped; two placements that build the same network are equal and have
the same :attr:`Placement.key`. Choices are written as

    "keep"                                   the baseline's own layer
    "quadratic"                              the family with its default options
    "quadratic:t4"                           the family's primary option (here type=t4)
    "quadratic:type=t4,memory=save"          options by name
    {"family": "quadratic", "type": "t4"}    or {"family": ..., "options": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from autobuild.errors import InvalidType, InvalidValue
from autobuild.rewrite.family import get_family

__all__ = ["KEEP", "Choice", "Placement"]

KEEP = "keep"


@dataclass(frozen=True)
class Choice:
    """A family and its complete, validated options (as sorted (name, value) pairs)."""

    family: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, family: str, options: Mapping[str, Any] | None = None) -> Choice:
        variant = get_family(family)
        parsed = variant.parse_options(dict(options or {}))
        return cls(variant.name, tuple(sorted(parsed.items())))

    @classmethod
    def parse(cls, value: Any, *, where: str = "") -> Choice | None:
        """A choice from its written forms (see the module docstring); None for ``keep``."""
        at = f" for site {where}" if where else ""
        if isinstance(value, Choice):
            return value
        if value is None:  # (`site:` with nothing after it, in YAML): left unwritten
            raise InvalidValue(f"choice{at} is empty (None); write 'keep' to keep the "
                               "baseline's layer, or a family")
        if value == KEEP:
            return None
        if isinstance(value, str):
            family, sep, rest = value.partition(":")
            if not sep:
                return cls.of(family.strip())
            variant = get_family(family.strip())
            if "=" not in rest:
                if not variant.primary_option:
                    raise InvalidValue(f"choice {value!r}{at}: {variant.name} has no primary "
                                       "option; write its options as name=value")
                return cls.of(variant.name, {variant.primary_option: rest.strip()})
            options: dict[str, str] = {}
            for pair in rest.split(","):
                key, eq, val = pair.partition("=")
                if not eq or not key.strip():
                    raise InvalidValue(f"choice {value!r}{at}: options are name=value pairs "
                                       "separated by commas")
                if key.strip() in options:
                    raise InvalidValue(f"choice {value!r}{at}: option {key.strip()!r} is "
                                       "given twice")
                options[key.strip()] = val.strip()
            return cls.of(variant.name, options)
        if isinstance(value, Mapping):
            data = dict(value)
            family = data.pop("family", None)
            if not isinstance(family, str):
                raise InvalidValue(f"choice {value!r}{at} needs a 'family' (a string)")
            if family == KEEP:
                if any(v not in (None, {}) for v in data.values()):
                    raise InvalidValue(f"choice {value!r}{at}: keep takes no options")
                return None
            options = data.pop("options", None)
            if options is not None and data:
                raise InvalidValue(f"choice {value!r}{at}: give options either under "
                                   "'options' or beside 'family', not both")
            if options is not None and not isinstance(options, Mapping):
                raise InvalidType(f"choice {value!r}{at}: 'options' must be a mapping")
            return cls.of(family, options if options is not None else data)
        raise InvalidValue(f"choice {value!r}{at} must be 'keep', 'family', 'family:value', "
                           "'family:name=value,...' or a mapping with 'family'")

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "options": self.opts}

    def short(self) -> str:
        """``family`` or ``family:primary``; with other options away from their defaults,
        those and the primary as name=value: ``parameter-free:layout=max,pool=shift``.
        Either form is a choice :meth:`parse` reads back."""
        variant = get_family(self.family)
        primary = variant.primary_option
        defaults = {o.name: o.default for o in variant.options}
        changed = [f"{k}={v}" for k, v in self.options
                   if k != primary and k in defaults and v != defaults[k]]
        if changed:
            named = [f"{primary}={self.opts[primary]}"] if primary else []
            return f"{self.family}:{','.join(named + changed)}"
        return f"{self.family}:{self.opts[primary]}" if primary else self.family

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.family}:{opts}" if opts else self.family


class Placement(Mapping[str, Choice]):
    """An immutable, canonical mapping site name -> :class:`Choice`."""

    def __init__(self, choices: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        if choices is not None and not isinstance(choices, Mapping):
            raise InvalidType(f"a placement maps site names to choices, got "
                              f"{type(choices).__name__}")
        items: dict[str, Choice] = {}
        for site, value in [*(choices or {}).items(), *more.items()]:
            if not isinstance(site, str) or not site:
                raise InvalidValue(f"placement site names are non-empty strings, got {site!r}")
            choice = Choice.parse(value, where=site)
            if choice is not None:
                items[site] = choice
        self._items = dict(sorted(items.items()))
        self._key: str | None = None

    def __getitem__(self, site: str) -> Choice:
        return self._items[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Placement({ {k: str(v) for k, v in self._items.items()} })"

    @property
    def key(self) -> str:
        """A stable hash of the canonical form: equal placements, equal keys."""
        if self._key is None:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                              default=str)
            self._key = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._key

    @property
    def families(self) -> set[str]:
        return {c.family for c in self._items.values()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {site: choice.to_dict() for site, choice in self._items.items()}

    def groups(self) -> list[tuple[Choice, list[str]]]:
        """The sites grouped by identical choice (the compact form plans are written in)."""
        by_choice: dict[Choice, list[str]] = {}
        for site, choice in self._items.items():
            by_choice.setdefault(choice, []).append(site)
        return sorted(by_choice.items(), key=lambda item: (item[0].family, str(item[0])))

    def summary(self) -> str:
        """One line: ``quadratic:ours x5, multiplicative x2`` ("baseline" when empty)."""
        counts = Counter(c.short() for c in self._items.values())
        return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "baseline"

    def describe(self) -> str:
        """:meth:`summary` with where each choice goes, so that placements with the same
        counts on other modules read differently: ``pde-global:plain x1 in layer3;
        quadratic:ours x6 in layer1.*`` (up to 3 sites by name; more by the deepest module
        holding them under each top-level module, so two subsets of one stage may read
        alike: :attr:`key` tells every placement apart)."""
        by_choice: dict[str, list[str]] = {}
        for site, choice in self._items.items():
            by_choice.setdefault(choice.short(), []).append(site)
        return "; ".join(f"{short} x{len(sites)} in {_where(sites)}"
                         for short, sites in sorted(by_choice.items())) or "baseline"

    def merged(self, other: Placement) -> Placement:
        """This placement plus ``other``'s choices (a site in both must agree)."""
        for site in set(self) & set(other):
            if self[site] != other[site]:
                from autobuild.errors import InfeasiblePlacement

                raise InfeasiblePlacement(f"site {site} has two choices: {self[site]} and "
                                          f"{other[site]}")
        return Placement({**self._items, **other._items})


def _where(sites: list[str]) -> str:
    """``layer1.*,layer3.0.conv1``: the sites, or per top-level module the deepest module
    holding all of its sites."""
    if len(sites) <= 3:
        return ",".join(sites)
    by_top: dict[str, list[list[str]]] = {}
    for site in sites:
        by_top.setdefault(site.split(".")[0], []).append(site.split("."))
    out = []
    for paths in by_top.values():
        if len(paths) == 1:
            out.append(".".join(paths[0]))
            continue
        out.append(".".join(os.path.commonprefix(paths)) + ".*")  # (element-wise on lists)
    return ",".join(out)
