"""Turning (baseline, family, options, sites) into a plan and a plan into a model."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autobuild.errors import AutobuildError
from autobuild.rewrite.plan import Conversion, Plan
from autobuild.rewrite.rewriter import Change, Rewriter
from autobuild.rewrite.sites import Site, find_sites, select_sites

__all__ = ["Baseline", "Converted", "apply_plan", "candidate_sites", "convert_model",
           "plan_of", "resolve_baseline"]

INITS = ("scratch", "preserve")


@dataclass
class Baseline:
    """A baseline module plus what a plan needs to rebuild it."""

    module: nn.Module
    name: str
    input_size: tuple[int, int, int]
    root: str = ""
    num_classes: int | None = None
    weights: str | None = None
    #: Module classes (or class names / qualified names) fx keeps opaque.
    leaf_modules: tuple[Any, ...] = ()

    def leaf_names(self) -> list[str]:
        return [m.__name__ if isinstance(m, type) else str(m) for m in self.leaf_modules]


@dataclass
class Converted:
    """The result of a conversion pass: the model, its plan and the record of changes."""

    model: nn.Module
    plan: Plan
    baseline: Baseline
    changes: list[Change] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)


def resolve_baseline(model_or_name: nn.Module | str, *, num_classes: int | None = None,
                     input_size: Sequence[int] | None = None, weights: str | None = None,
                     leaf_modules: Iterable[Any] = ()) -> Baseline:
    """Build a named baseline, or wrap a user's module."""
    leaves = tuple(leaf_modules)
    if isinstance(model_or_name, nn.Module):
        if weights:
            from autobuild.models import load_weights

            load_weights(model_or_name, weights)
        return Baseline(model_or_name, f"custom:{type(model_or_name).__name__}",
                        _size(input_size or (3, 224, 224)), "", num_classes, weights, leaves)
    from autobuild.models import build_model, get_model_entry

    entry = get_model_entry(model_or_name)
    size = _size(input_size or entry.input_size)
    # A dataset with other channels (e.g. grayscale) needs a stem built for them.
    extra = {"in_chans": size[0]} if size[0] != entry.input_size[0] else {}
    try:
        module = build_model(model_or_name, num_classes=num_classes, weights=weights, **extra)
    except TypeError as exc:
        if not extra:
            raise
        raise AutobuildError(f"{model_or_name} is built for {entry.input_size[0]}-channel input "
                             f"and cannot take {size[0]} channels") from exc
    return Baseline(module, model_or_name, size, entry.trace_root, num_classes, weights, leaves)


def _size(size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) <= 0:
        raise AutobuildError(f"input size must be C,H,W with positive values, got {size}")
    return size  # type: ignore[return-value]


def candidate_sites(baseline: Baseline, family: str, options: dict[str, Any] | None = None
                    ) -> list[Site]:
    """The sites of ``baseline`` that ``family`` (with ``options``) can convert."""
    from autobuild.variants import get_variant

    variant = get_variant(family)
    opts = variant.parse_options(options)
    all_sites = find_sites(baseline.module, baseline.input_size, root=baseline.root,
                           leaf_modules=baseline.leaf_modules)
    return variant.candidate_sites(all_sites, opts)


def _convert_step(model: nn.Module, baseline: Baseline, family: str, options: dict[str, Any],
                  patterns: Iterable[str] | None, init: str, *, exact: bool
                  ) -> tuple[nn.Module, Conversion, list[Change], list[Site]]:
    from autobuild.variants import get_variant

    variant = get_variant(family)
    opts = variant.parse_options(options)
    all_sites = find_sites(model, baseline.input_size, root=baseline.root,
                           leaf_modules=baseline.leaf_modules)
    candidates = variant.candidate_sites(all_sites, opts)
    if not candidates:
        kinds = "/".join(variant.site_kinds)
        examples = getattr(variant, "example_models", ())
        raise AutobuildError(
            f"{variant.name} converts {kinds} sites and {baseline.name} has none"
            + (f"; it applies to e.g. {', '.join(examples)}" if examples else ""))
    if exact and patterns is not None:
        by_name = {s.name: s for s in candidates}
        missing = [p for p in patterns if p not in by_name]
        if missing:
            raise AutobuildError(f"plan names {variant.name} site(s) {', '.join(missing)} that "
                                 f"{baseline.name} does not have")
        chosen = [by_name[p] for p in patterns]
    elif patterns is None:
        chosen = variant.default_sites(candidates, opts)
        if not chosen:
            names = ", ".join(s.name for s in candidates[:20])
            raise AutobuildError(f"{variant.name} has no default site in {baseline.name}; name "
                                 f"sites with --sites (candidates: {names})")
    else:
        chosen = select_sites(candidates, patterns, family=variant.name, model=baseline.name)
    if init not in INITS:
        raise AutobuildError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    variant.check(chosen, opts, init)
    rewriter = Rewriter(model, baseline.root, variant.name,
                        leaf_modules=tuple(baseline.leaf_modules))
    variant.apply(rewriter, chosen, opts, init)
    return (rewriter.model, Conversion(variant.name, opts, [s.name for s in chosen]),
            rewriter.changes, chosen)


def convert_model(baseline: Baseline, family: str, *, sites: Iterable[str] | None = None,
                  options: dict[str, Any] | None = None, init: str = "scratch") -> Converted:
    """Convert a copy of ``baseline`` (the baseline itself is left untouched)."""
    model = copy.deepcopy(baseline.module)
    patterns = list(sites) if sites is not None else None
    model, conversion, changes, chosen = _convert_step(model, baseline, family, options or {},
                                                       patterns, init, exact=False)
    plan = Plan(baseline.name, [conversion], init, baseline.num_classes, baseline.input_size,
                baseline.weights, leaf_modules=baseline.leaf_names())
    model._autobuild_plan = plan
    return Converted(model, plan, baseline, changes, chosen)


def apply_plan(plan: Plan, baseline: nn.Module | None = None, *,
               load_baseline_weights: bool = True) -> Converted:
    """Rebuild the model a plan describes. Custom (non-registry) baselines must be passed."""
    if plan.model.startswith("custom:"):
        if baseline is None:
            raise AutobuildError(f"plan is for a custom model ({plan.model}); pass the baseline "
                                 "module (autobuild.load(dir, baseline=module))")
        base = resolve_baseline(baseline, num_classes=plan.num_classes,
                                input_size=plan.input_size, leaf_modules=plan.leaf_modules)
    else:
        weights = plan.weights if load_baseline_weights else None
        base = resolve_baseline(plan.model, num_classes=plan.num_classes,
                                input_size=plan.input_size, weights=weights,
                                leaf_modules=plan.leaf_modules)
    model = copy.deepcopy(base.module)
    changes: list[Change] = []
    chosen: list[Site] = []
    for conv in plan.conversions:
        model, _, step_changes, step_sites = _convert_step(
            model, base, conv.family, conv.options, conv.sites, plan.init, exact=True)
        changes += step_changes
        chosen += step_sites
    model._autobuild_plan = plan
    return Converted(model, plan, base, changes, chosen)


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a converted model was built from (None for a model autobuild did not build)."""
    return getattr(model, "_autobuild_plan", None)
