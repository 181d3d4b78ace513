"""One analysis per baseline: the traced graph with shapes and per-node costs, every site of
every kind with its region, the residual blocks and stages. Every family, every check, cost
and build of a placement reuses it; nothing is traced or shape-propagated twice.

    a = Analysis(baseline)
    a.sites("quadratic")           # what a family may convert, with costs
    a.check(p)                     # InfeasiblePlacement before anything is built
    a.cost(p)                      # Counts predicted without building the model
    a.build(p, init="preserve")    # the converted model; plan_of(model) is a.plan(p, init)

A build whose predicted size is absurd is refused before anything is allocated: more than
:data:`MAX_PARAMS` parameters or :data:`MAX_MACS` MACs per image (override with the
environment variables ``AUTOBUILD_MAX_PARAMS`` / ``AUTOBUILD_MAX_MACS``, or
``build(..., check_size=False)``).
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autobuild.errors import AutobuildError, InfeasiblePlacement, InvalidValue, check_seed
from autobuild.rewrite.baseline import Baseline, annotate
from autobuild.rewrite.cost import (
    MAX_MACS,
    MAX_PARAMS,
    Counts,
    count_module,
    human,
    meta_twin,
    size_limits,
)
from autobuild.rewrite.family import Variant, get_family, own_errors
from autobuild.rewrite.graph import Block, find_blocks
from autobuild.rewrite.placement import Choice, Placement
from autobuild.rewrite.plan import INITS, Plan
from autobuild.rewrite.record import BuildRecord, set_record
from autobuild.rewrite.rewriter import Rewriter
from autobuild.rewrite.sites import Region, Site, find_sites, select_sites
from autobuild.rewrite.trace import trace

__all__ = ["MAX_MACS", "MAX_PARAMS", "Analysis", "Baseline", "size_limits"]

def _prefixed(site: Site, region: Region, root: str) -> tuple[Site, Region]:
    if not root:
        return site, region
    from dataclasses import replace

    extra = dict(site.extra)
    for key in ("bn", "act"):  # module names; functions ("fn:relu") stay as they are
        if extra.get(key) and not extra[key].startswith("fn:"):
            extra[key] = f"{root}.{extra[key]}"
    if site.kind == "network":
        return replace(site, target=root), Region(region.nodes, frozenset({root}))
    modules = frozenset(f"{root}.{m}" if m else root for m in region.modules)
    return (replace(site, name=f"{root}.{site.name}", target=f"{root}.{site.target}",
                    extra=extra), Region(region.nodes, modules))


class Analysis:
    """Everything autobuild knows about one baseline (see the module docstring)."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline
        root = baseline.root_module
        self.gm = trace(root, leaf_modules=baseline.leaf_modules, name=baseline.name)
        costs = annotate(self.gm, baseline.input_size)
        node_of = {n.name: n for n in self.gm.graph.nodes}
        self.blocks: dict[str, Block] = {b.path: b for b in find_blocks(self.gm)}
        self._node_costs = costs
        pairs = find_sites(self.gm, root, list(self.blocks.values()),
                           {node_of[k]: v for k, v in costs.items()})
        self._sites: dict[str, Site] = {}
        self._regions: dict[str, Region] = {}
        for site, region in pairs:
            site, region = _prefixed(site, region, baseline.root)
            self._sites[site.name] = site
            self._regions[site.name] = region
        network = self._sites["network"]
        self.counts = Counts(network.params, network.macs, network.flops)
        self._cost_cache: dict[tuple[str, Choice], Counts] = {}
        self._param_sets: dict[str, dict[int, int]] = {}

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for s in self._sites.values():
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return f"Analysis({self.baseline.name}, {kinds})"

    # ---- sites ------------------------------------------------------------------------
    def sites(self, family: str | None = None, options: Mapping[str, Any] | None = None
              ) -> list[Site]:
        """Every site (no ``family``), or the sites ``family`` can convert with ``options``."""
        if family is None:
            return list(self._sites.values())
        variant = get_family(family)
        opts = variant.parse_options(dict(options or {}))
        return [s for s in self._sites.values()
                if variant.accepts(s, opts) and not variant.refusal(s, opts, self)]

    def site(self, name: str) -> Site:
        if name not in self._sites:
            close = difflib.get_close_matches(name, list(self._sites), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InfeasiblePlacement(f"{self.baseline.name} has no site {name!r}{hint}; "
                                      f"`autobuild sites {self.baseline.name} --to all` lists "
                                      "them")
        return self._sites[name]

    def region(self, name: str) -> Region:
        """The graph nodes and modules of site ``name``."""
        self.site(name)
        return self._regions[name]

    def module(self, site: Site) -> nn.Module:
        """The baseline's module at ``site`` (the root for the network)."""
        return self.baseline.module.get_submodule(site.target) if site.target \
            else self.baseline.root_module

    def meta_module(self, site: Site) -> nn.Module:
        """A copy of the site's module on the meta device (no data copied)."""
        return meta_twin(self.module(site))

    def call_nodes(self, module: str) -> frozenset[str]:
        """Names of the graph nodes that call the module at ``module`` (a full path)."""
        root = self.baseline.root
        local = module[len(root) + 1:] if root and module.startswith(root + ".") else module
        return frozenset(n.name for n in self.gm.graph.nodes
                         if n.op == "call_module" and n.target == local)

    def node_costs(self, nodes: Iterable[str]) -> tuple[int, int]:
        """(MACs, FLOPs) of the given graph nodes."""
        macs = flops = 0
        for name in nodes:
            m, f = self._node_costs.get(name, (0, 0))
            macs, flops = macs + m, flops + f
        return macs, flops

    def select(self, family: str, sites: Iterable[str] | str | None = None,
               options: Mapping[str, Any] | None = None) -> Placement:
        """The placement ``family`` (with ``options``) on the sites matching the glob
        patterns ``sites`` (default: the family's default sites)."""
        variant = get_family(family)
        opts = variant.parse_options(dict(options or {}) if isinstance(options, Mapping)
                                     else options)
        candidates = self.sites(variant.name, opts)
        name = self.baseline.name
        # Sites named explicitly are matched among every site of the family's kinds, so that
        # one it cannot convert is refused with its reason, not reported as unknown.
        accepted = [s for s in self._sites.values() if variant.accepts(s, opts)]
        if not accepted:
            kinds = "/".join(variant.site_kinds)
            examples = ", ".join(variant.example_models)
            hint = variant.hint_without_sites(list(self._sites.values()), opts)
            raise InfeasiblePlacement(f"{variant.name} converts {kinds} sites and {name} has "
                                      f"none; " + (hint or f"it applies to e.g. {examples}"))
        if sites is None and not candidates:
            first = accepted[0]
            raise InfeasiblePlacement(f"{variant.name} with these options converts no site "
                                      f"of {name} (e.g. {first.name}: "
                                      f"{variant.refusal(first, opts, self)})")
        if sites is None:
            chosen = variant.default_sites(candidates, opts)
            if not chosen:
                shown = ", ".join(s.name for s in candidates[:20])
                # A site refused with these options (e.g. an even pool kernel) is the likelier
                # culprit than a missing --sites: say why it was left out.
                refused = next(((s, variant.refusal(s, opts, self)) for s in accepted
                                if s not in candidates and variant.refusal(s, opts, self)),
                               None)
                why = (f"; {refused[0].name} is left out because {refused[1]}" if refused
                       else "")
                raise InfeasiblePlacement(f"{variant.name} has no default site in {name}{why}; "
                                          f"name sites with --sites (candidates: {shown})")
        else:
            patterns = [sites] if isinstance(sites, str) else list(sites)
            if not patterns:
                raise InvalidValue("sites is an empty list; name at least one site pattern "
                                   "or pass None for the family's default sites")
            chosen = select_sites(accepted, patterns, family=variant.name, model=name)
        variant.refuse_idle(chosen, opts)
        variant.refuse_new(chosen, opts, self)
        choice = Choice.of(variant.name, opts)
        return Placement({s.name: choice for s in chosen})

    # ---- placements ----------------------------------------------------------------
    def _items(self, placement: Placement) -> list[tuple[Site, Choice, Variant, Region]]:
        items = []
        for name, choice in placement.items():
            site = self.site(name)
            variant = get_family(choice.family)
            opts = choice.opts
            if not variant.accepts(site, opts):
                kinds = "/".join(variant.site_kinds)
                raise InfeasiblePlacement(
                    f"{variant.name} ({choice}) does not convert site {name}, a {site.kind} "
                    f"site; it converts {kinds} sites" if site.kind not in variant.site_kinds
                    else f"{variant.name} ({choice}) does not convert site {name}: it takes "
                    f"only some {site.kind} sites (Analysis.sites({variant.name!r}), or "
                    f"`autobuild sites MODEL --to {variant.name}`, lists them)")
            reason = variant.refusal(site, opts, self)
            if reason:
                raise InfeasiblePlacement(f"{variant.name} cannot convert site {name}: {reason}")
            items.append((site, choice, variant, variant.region(site, opts, self)))
        return items

    def check(self, placement: Placement | Mapping[str, Any], init: str = "scratch") -> None:
        """Raise :class:`InfeasiblePlacement` for a placement that cannot be built: an
        unknown site, a family that refuses a site, two choices that overlap, or a family's
        own refusal of the combination (e.g. ``init`` it cannot honour)."""
        placement = _as_placement(placement)
        if init not in INITS:
            raise InvalidValue(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        items = self._items(placement)
        for (s1, c1, _, r1), (s2, c2, _, r2) in itertools.combinations(items, 2):
            if r1.overlaps(r2):
                inner, outer = (s1, s2) if s1.depth > s2.depth else (s2, s1)
                ci, co = (c1, c2) if inner is s1 else (c2, c1)
                relation = ("lies inside" if self._regions[inner.name].nodes
                            <= self._regions[outer.name].nodes else "overlaps")
                raise InfeasiblePlacement(
                    f"sites {inner.name} ({ci.short()}) and {outer.name} ({co.short()}) "
                    f"overlap: {inner.name} {relation} what {outer.name} replaces; a placement "
                    "takes one of them")
        for choice, names in placement.groups():
            variant = get_family(choice.family)
            variant.check([self._sites[n] for n in names], choice.opts, init, self)

    def check_new(self, placement: Placement | Mapping[str, Any]) -> None:
        """Refuse what only new input is refused for (``Variant.refuse_new``, e.g. a QL
        width that rounds to 0 channels): for a placement a user wrote, not one a saved
        plan holds. Unknown and refused sites are named first; :meth:`check` does the rest."""
        placement = _as_placement(placement)
        self._items(placement)  # unknown sites and refused sites first, with their reasons
        for choice, names in placement.groups():
            get_family(choice.family).refuse_new([self._sites[n] for n in names],
                                                 choice.opts, self)

    def cost(self, placement: Placement | Mapping[str, Any]) -> Counts:
        """Params, MACs and FLOPs of the built placement, predicted without building it:
        the baseline's counts, minus each choice's region, plus what replaces it. Equal to
        ``count(build(placement))`` (of the traced root: the backbone of a detector)."""
        placement = _as_placement(placement)
        self.check(placement)
        params, macs, flops = self.counts.params, self.counts.macs, self.counts.flops
        removed: set[str] = set()
        converted_calls: dict[str, set[int]] = {}
        for site, choice, variant, region in self._items(placement):
            new = self._choice_cost(site, choice, variant)
            rm_macs, rm_flops = self.node_costs(region.nodes)
            params += new.params
            removed |= region.modules
            macs += new.macs - rm_macs
            flops += new.flops - rm_flops
            if site.call >= 0:
                converted_calls.setdefault(site.target, set()).add(site.call)
        # A shared module all of whose calls were converted is dropped (Rewriter.replace).
        removed |= {t for t, calls in converted_calls.items() if len(calls) == self.calls_of(t)}
        return Counts(params - self.params_removed(removed), macs, flops)

    def calls_of(self, target: str) -> int:
        """How many times the traced root calls the module ``target`` (a full path)."""
        root = self.baseline.root
        local = target[len(root) + 1:] if root and target.startswith(root + ".") else target
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == local)

    def _choice_cost(self, site: Site, choice: Choice, variant: Variant) -> Counts:
        key = (site.name, choice)
        if key not in self._cost_cache:
            with own_errors(variant, site):
                self._cost_cache[key] = variant.cost(site, choice.opts, self)
        return self._cost_cache[key]

    def params_removed(self, modules: Iterable[str]) -> int:
        """Parameters that replacing the given module subtrees ("" = the root) takes out of
        the traced root: each once, and none that a module left in place still uses (a
        weight tied to one outside them)."""
        modules = set(modules)
        gone: dict[int, int] = {}
        for path in modules:
            if path not in self._param_sets:
                m = self.baseline.module.get_submodule(path) if path else \
                    self.baseline.root_module
                self._param_sets[path] = {id(p): p.numel() for p in m.parameters()}
            gone.update(self._param_sets[path])
        if not gone:
            return 0
        root = self.baseline.root

        def replaced(name: str) -> bool:
            full = f"{root}.{name}" if root else name
            return any(m == "" or full.startswith(m + ".") for m in modules)

        kept = {id(p) for name, p in self.baseline.root_module.named_parameters(
            remove_duplicate=False) if not replaced(name)}
        return sum(n for i, n in gone.items() if i not in kept)

    def applied_cost(self, variant: Variant, site: Site, options: dict[str, Any]) -> Counts:
        """What replaces ``site``'s region, measured by applying the choice to a meta-device
        copy of the baseline and counting the whole root (for passes that edit the graph or
        rebuild the network)."""
        rewriter = self._rewriter(meta_twin(self.baseline.module))
        with torch.device("meta"):
            rewriter.apply(variant, site, options, "scratch")
        model = rewriter.finish()
        root = model.get_submodule(self.baseline.root) if self.baseline.root else model
        after = count_module(root, self.baseline.input_size, per_module=False)
        region = variant.region(site, options, self)
        rm_macs, rm_flops = self.node_costs(region.nodes)
        rm_params = self.params_removed(region.modules)
        return Counts(after.params - self.counts.params + rm_params,
                      after.macs - self.counts.macs + rm_macs,
                      after.flops - self.counts.flops + rm_flops)

    def _rewriter(self, model: nn.Module) -> Rewriter:
        return Rewriter(model, self.baseline.root, graph_source=self.gm.graph,
                        leaf_modules=tuple(self.baseline.leaf_modules), analysis=self)

    def plan(self, placement: Placement | Mapping[str, Any], init: str = "scratch") -> Plan:
        b = self.baseline
        return Plan(b.name, _as_placement(placement), init, b.num_classes, b.input_size,
                    b.weights, b.leaf_names(), model_args=b.model_args)

    def check_size(self, placement: Placement | Mapping[str, Any]) -> Counts:
        """The predicted counts of ``placement``; an :class:`AutobuildError` when they are
        over :func:`size_limits` (nothing has been built or allocated)."""
        counts = self.cost(placement)
        max_params, max_macs = size_limits()
        if counts.params > max_params or counts.macs > max_macs:
            what = (f"{human(counts.params)} parameters ({human(4 * counts.params)}B in "
                    f"float32)" if counts.params > max_params else
                    f"{human(counts.macs)} MACs per image")
            var, limit = (("AUTOBUILD_MAX_PARAMS", max_params) if counts.params > max_params
                          else ("AUTOBUILD_MAX_MACS", max_macs))
            raise AutobuildError(
                f"{self.baseline.name} -> {_as_placement(placement).summary()} would have "
                f"{what}, over the limit of {human(limit)}; nothing was built (check the "
                f"options, e.g. a width or step count; set {var} to allow it)")
        return counts

    def build(self, placement: Placement | Mapping[str, Any], init: str = "scratch", *,
              model: nn.Module | None = None, check_size: bool = True,
              seed: int | None = None) -> nn.Module:
        """The converted model (a copy; the baseline is untouched). ``model``: build on this
        module instead of a copy of the baseline (it must have the baseline's structure).
        ``seed``: the new layers are initialised right after ``torch.manual_seed(seed)``,
        so they do not depend on what the process drew before (a search trial, ``train``
        and ``export`` build the same network from the same seed and baseline).
        An absurd size is refused before anything is allocated (see the module docstring);
        a build on the meta device allocates nothing and is not checked."""
        if seed is not None:
            check_seed(seed)
        placement = _as_placement(placement)
        self.check(placement, init)
        if check_size and placement and torch.empty(()).device.type != "meta":
            self.check_size(placement)
        target = copy.deepcopy(self.baseline.module) if model is None else model
        if seed is not None:
            torch.manual_seed(seed)
        # (the modules themselves, not their ids: a replaced module's id is reused)
        training, kept = target.training, set(target.modules())
        rewriter = self._rewriter(target)
        # Module swaps first (innermost first); the passes that need the graph (shared
        # calls, network rewrites) last, so the graph they copy still describes the model.
        order = sorted(self._items(placement), key=lambda it: (
            it[0].kind == "network", it[0].call >= 0, -it[0].depth, it[0].name))
        for site, choice, variant, _ in order:
            rewriter.apply(variant, site, choice.opts, init)
        built = rewriter.finish()
        for m in built.modules():  # new modules take the model's mode (an eval() baseline
            if m not in kept:  # converts to a model whose new BNs are in eval too)
                m.training = training
        set_record(built, BuildRecord(self.plan(placement, init), rewriter.site_modules,
                                      rewriter.changes, self.baseline.root))
        return built


def _as_placement(placement: Placement | Mapping[str, Any]) -> Placement:
    return placement if isinstance(placement, Placement) else Placement(placement)
