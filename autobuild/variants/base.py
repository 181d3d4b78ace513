"""What a family is: a named pass over chosen sites, with typed options.

A family file subclasses :class:`Variant`, sets its class attributes and calls
:func:`register_variant` at import time; the CLI, the contract tests and the search
discover it from the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from autobuild.errors import AutobuildError, unknown_name
from autobuild.rewrite.rewriter import Rewriter
from autobuild.rewrite.sites import Site

__all__ = ["Option", "Variant"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One ``--option name=value`` of a family."""

    name: str
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    type: type = str

    def parse(self, value: Any, family: str) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(value)
                value = value.lower() in _TRUE
            else:
                value = self.type(value)
        except (TypeError, ValueError) as exc:
            raise AutobuildError(f"option {self.name}={value!r} of {family} must be a "
                                 f"{self.type.__name__}") from exc
        if self.choices is not None and value not in self.choices:
            raise AutobuildError(f"option {self.name}={value!r} of {family} is not valid; valid:"
                                 f" {', '.join(map(str, self.choices))}")
        return value


class Variant:
    """Base class of a family. Subclasses set the class attributes and implement
    :meth:`build` (one site -> one replacement module) or override :meth:`apply`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    site_kinds: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[Option, ...]] = ()
    inits: ClassVar[tuple[str, ...]] = ("scratch", "preserve")
    #: Module types fx must treat as opaque, so converted models can be traced again.
    leaf_modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Baselines the family applies to (named in errors); the first is the contract-test model.
    example_models: ClassVar[tuple[str, ...]] = ("cifar_resnet20",)

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        """(model, options, site patterns) the registry-driven contract tests run: by
        default every choice of every option that has choices, on ``example_models[0]``."""
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = []
        for option in self.options:
            for choice in option.choices or ():
                cases.append((self.example_models[0], {option.name: choice}, None))
        return cases or [(self.example_models[0], {}, None)]

    # ---- options --------------------------------------------------------------------
    def parse_options(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        """Validate and type ``raw`` (strings from the CLI are fine); fill in defaults."""
        raw = dict(raw or {})
        known = {o.name: o for o in self.options}
        for key in raw:
            if key not in known:
                raise unknown_name(f"option of {self.name}", key, known or ["(none)"])
        return {o.name: o.parse(raw[o.name], self.name) if o.name in raw else o.default
                for o in self.options}

    # ---- sites ----------------------------------------------------------------------
    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        """Whether this family can convert ``site`` (default: by site kind)."""
        return site.kind in self.site_kinds

    def candidate_sites(self, sites: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        return [s for s in sites if self.accepts(s, options)]

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """The sites converted when the user names none (default: every candidate)."""
        return list(candidates)

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str) -> None:
        """Refuse a combination that cannot work, before anything is built."""
        if init not in self.inits:
            raise AutobuildError(f"{self.name} does not support --init {init}; valid: "
                                 f"{', '.join(self.inits)}")

    # ---- the pass -------------------------------------------------------------------
    def apply(self, rewriter: Rewriter, sites: Sequence[Site], options: dict[str, Any],
              init: str) -> None:
        """Convert ``sites`` in place of the rewriter's model (default: one module each)."""
        for site in sites:
            rewriter.replace(site, self.build(site, rewriter.module(site), options, init))

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build() or apply()")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "site_kinds": list(self.site_kinds),
            "inits": list(self.inits),
            "options": [{"name": o.name, "default": o.default, "choices": list(o.choices)
                         if o.choices else None, "help": o.help} for o in self.options],
        }
