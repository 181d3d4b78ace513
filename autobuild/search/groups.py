"""A search space's groups matched against the baseline: the sites of each group and its
choices, every choice checked on the sites it would take before any study or trial."""

from __future__ import annotations

import json
from dataclasses import dataclass

from autobuild.errors import AutobuildError
from autobuild.rewrite import Analysis, Choice
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


def resolve_groups(space: SearchSpace, analysis: Analysis) -> list[ResolvedGroup]:
    """Match each group's patterns against the baseline's sites (every pattern must match a
    site some choice of the group can take) and parse its choices."""
    import fnmatch

    groups = []
    names = [s.name for s in analysis.sites()]
    for i, group in enumerate(space.groups):
        label = group.name or f"g{i}"
        # A mapping choice is kept as its JSON text (Optuna's categorical values are scalars).
        choices = [Choice.parse(json.loads(c) if c.startswith("{") else c, where=label)
                   for c in group.choices]
        sites: list[str] = []
        for pattern in group.sites:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise AutobuildError(f"search space groups[{i}].sites: pattern {pattern!r} "
                                     f"matches no site of {analysis.baseline.name}")
            sites += [n for n in hits if n not in sites]
        resolved = ResolvedGroup(label, sites, list(group.choices), choices, group.per_site)
        _refuse_choices(resolved, i, analysis, space.init)
        groups.append(resolved)
    if all(c is None for g in groups for c in g.choices):
        raise AutobuildError("search space has nothing to search: every group's only choice "
                             "is keep")
    return groups


def _refuse_choices(group: ResolvedGroup, index: int, analysis: Analysis, init: str) -> None:
    """A choice that takes none of its group's sites (the search would only ever keep
    them), or that its family refuses on those it takes (an ``init`` it cannot honour, a
    QL width of 0 channels), is refused with the space: before any study or trial."""
    from autobuild.errors import InfeasiblePlacement
    from autobuild.rewrite import get_family

    for label, choice in zip(group.labels, group.choices, strict=True):
        if choice is None:
            continue
        variant = get_family(choice.family)
        sites = [analysis.site(n) for n in group.sites]
        takers = [s for s in sites if variant.accepts(s, choice.opts)
                  and not variant.refusal(s, choice.opts, analysis)]
        where = f"search space groups[{index}].choices: {label}"
        if not takers:
            kinds = sorted({s.kind for s in sites})
            why = next((variant.refusal(s, choice.opts, analysis) for s in sites
                        if variant.accepts(s, choice.opts)), "")
            raise AutobuildError(
                f"{where}: converts none of the group's sites ({', '.join(group.sites[:3])}"
                f"{', ...' if len(group.sites) > 3 else ''}): " + (
                    f"{why}" if why else f"{variant.name} takes "
                    f"{'/'.join(variant.site_kinds)} sites, these are {'/'.join(kinds)} "
                    f"(`autobuild sites {analysis.baseline.name} --to {variant.name}` lists "
                    "those it takes)"))
        try:
            variant.check(takers, choice.opts, init, analysis)
            variant.refuse_new(takers, choice.opts, analysis)
        except InfeasiblePlacement as exc:
            raise AutobuildError(f"{where}: {exc}") from None
