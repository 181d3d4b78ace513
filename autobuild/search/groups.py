"""A search space's groups matched against the baseline: the sites of each group and its
choices, every choice checked on the sites it would take before a new study starts."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.rewrite import Analysis, Choice, Site, get_family
from autobuild.search.space import SearchSpace

__all__ = ["ResolvedGroup", "resolve_groups"]


@dataclass
class ResolvedGroup:
    """A space group matched against the baseline: its sites and parsed choices."""

    name: str
    sites: list[str]
    labels: list[str]
    choices: list[Choice | None]
    per_site: bool
    #: label -> the sites of a per-site group where that choice is refused as new input
    #: (e.g. a QL width of 0 channels on the narrowest blocks): never proposed there.
    excluded: dict[str, set[str]] = field(default_factory=dict)

    def offers(self, label: str, site: str) -> bool:
        return site not in self.excluded.get(label, ())


def resolve_groups(space: SearchSpace, analysis: Analysis, *, new: bool = True
                   ) -> list[ResolvedGroup]:
    """Match each group's patterns against the baseline's sites (every pattern must match a
    site) and parse its choices; for a ``new`` study, check each choice on the sites it
    would take (a study made before these checks continues as it was made)."""
    groups = []
    names = [s.name for s in analysis.sites()]
    per_site: dict[str, int] = {}
    for i, group in enumerate(space.groups):
        label = group.name or f"g{i}"
        # A mapping choice is kept as its JSON text (Optuna's categorical values are scalars).
        choices = [Choice.parse(json.loads(c) if c.startswith("{") else c, where=label)
                   for c in group.choices]
        sites: list[str] = []
        for pattern in group.sites:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise AutobuildError(f"{space.key(f'groups.{i}.sites')}: pattern {pattern!r} "
                                     f"matches no site of {analysis.baseline.name}")
            sites += [n for n in hits if n not in sites]
        if group.per_site and new:  # each site is one parameter, "site:NAME": asked once
            for name in sites:
                if name in per_site:
                    raise AutobuildError(
                        f"{space.key(f'groups.{i}.sites')}: site {name!r} is also in per-site "
                        f"group {per_site[name]}; a site is decided by one per-site group "
                        "(merge their choices)")
                per_site[name] = i
        resolved = ResolvedGroup(label, sites, list(group.choices), choices, group.per_site)
        if new:
            _check_choices(resolved, space.key(f"groups.{i}.choices"), analysis, space.init)
        groups.append(resolved)
    if all(c is None for g in groups for c in g.choices):
        raise AutobuildError(f"{space.key().rstrip(': ')} has nothing to search: every group's "
                             "only choice is keep")
    return groups


def _check_choices(group: ResolvedGroup, key: str, analysis: Analysis, init: str) -> None:
    """Refuse a choice that takes none of its group's sites (the search would only ever
    keep them), or that its family refuses on those it takes (an ``init`` it cannot honour,
    a QL width of 0 channels). A group decided as one converts them all; in a per-site
    group the choice is refused only if it fits none of them, and is not offered on the
    sites it does not fit."""
    for label, choice in zip(group.labels, group.choices, strict=True):
        if choice is None:
            continue
        variant = get_family(choice.family)
        sites = [analysis.site(n) for n in group.sites]
        takers = [s for s in sites if variant.accepts(s, choice.opts)
                  and not variant.refusal(s, choice.opts, analysis)]
        where = f"{key}: {label}"
        if not takers:
            why = _why_none(variant, sites, choice, analysis)
            raise AutobuildError(f"{where}: converts none of the group's sites "
                                 f"({_few(group.sites)}): {why}")
        together = [takers] if not group.per_site else [[s] for s in takers]
        refusals = [_refusal(variant, part, choice, init, analysis) for part in together]
        if all(refusals):
            raise AutobuildError(f"{where}: {refusals[0]}")
        group.excluded[label] = {part[0].name for part, why in zip(together, refusals,
                                                                  strict=True) if why}


def _refusal(variant: Any, sites: list[Site], choice: Choice, init: str,
             analysis: Analysis) -> str:
    try:
        variant.check(sites, choice.opts, init, analysis)
        variant.refuse_new(sites, choice.opts, analysis)
    except InfeasiblePlacement as exc:
        return str(exc)
    return ""


def _why_none(variant: Any, sites: list[Site], choice: Choice, analysis: Analysis) -> str:
    why = next((variant.refusal(s, choice.opts, analysis) for s in sites
                if variant.accepts(s, choice.opts)), "")
    if why:
        return why
    kinds = sorted({s.kind for s in sites})
    defaults = {o.name: o.default for o in variant.options}
    flags = "".join(f" --option {k}={v}" for k, v in choice.opts.items() if v != defaults[k])
    hint = (f"`autobuild sites {analysis.baseline.name} --to {variant.name}{flags}` lists "
            "those it takes")
    if set(kinds) <= set(variant.site_kinds):  # the options, or the sites' shapes, rule out
        return (f"{choice.short()} takes none of these {'/'.join(kinds)} sites ({hint}; "
                f"`autobuild variants {variant.name}` lists its options)")
    return (f"{variant.name} takes {'/'.join(variant.site_kinds)} sites, these are "
            f"{'/'.join(kinds)} ({hint})")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
