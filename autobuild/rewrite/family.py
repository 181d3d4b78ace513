"""What a family is, for the engine: typed options, which sites it takes, what region of the
network a conversion replaces and what that costs, how it is built, and how its higher-order
part is switched off. Families subclass :class:`Variant` and register themselves here; the
engine finds them by name and never imports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from autobuild.errors import (
    AutobuildError,
    InfeasiblePlacement,
    InvalidType,
    InvalidValue,
    brief,
    unknown_name,
)
from autobuild.rewrite.cost import Counts, count_module, param_count, run_on_meta
from autobuild.rewrite.options import Option
from autobuild.rewrite.sites import Region, Site
from autobuild.rewrite.trace import register_leaf_module

# The analysis and the rewriter import this module; families see them through these names
# (autobuild.rewrite.Analysis and autobuild.rewrite.Rewriter) without an import cycle.
Analysis = Any
Rewriter = Any

__all__ = ["Option", "Variant", "add_family_loader", "get_family", "list_families", "own_errors",
           "register_family"]

class Variant:
    """Base class of a family. Subclasses set the class attributes and implement
    :meth:`build` (one site -> one replacement module) or override :meth:`apply`.

    The engine calls, for each (site, options) of a placement: :meth:`accepts` and
    :meth:`refusal` (can the family take this site?), :meth:`region` (what it replaces),
    :meth:`cost` (what the replacement costs, without building the model), :meth:`apply`
    (the edit) and :meth:`mask_modules` (which layers switch their higher-order part off).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    site_kinds: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[Option, ...]] = ()
    #: The option a short choice names: "quadratic:t4" means type=t4.
    primary_option: ClassVar[str | None] = None
    inits: ClassVar[tuple[str, ...]] = ("scratch", "preserve")
    #: Module types fx must treat as opaque, so converted models can be traced again.
    leaf_modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Baselines the family applies to (named in errors); the first is the contract-test model.
    example_models: ClassVar[tuple[str, ...]] = ("cifar_resnet20",)
    #: What :func:`autobuild.masked` switches off, in words (docs and `autobuild variants`).
    mask_effect: ClassVar[str] = ""
    #: Options whose default changed: ``{plan_version: {option: old default}}``. A plan
    #: written at that version or before that omits the option meant the old default (plans
    #: record every option since version 3, so a later default change needs a new version).
    legacy_defaults: ClassVar[dict[int, dict[str, Any]]] = {}
    #: Parameters a layer gained later: ``{plan_version: {parameter name: value}}``. Weights
    #: saved with a plan of that version or before lack them; ``autobuild.load`` fills them
    #: with the value that computes the function the model had when it was saved.
    legacy_parameters: ClassVar[dict[int, dict[str, float]]] = {}

    def hint_without_sites(self, sites: Sequence[Site], options: dict[str, Any]) -> str:
        """What to do when a baseline has no site these options accept (e.g. another
        option value that converts it); "" names the example models instead."""
        return ""

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        """(model, options, site patterns) the registry-driven contract tests run: by
        default every choice of every option that has choices, on ``example_models[0]``."""
        cases: list[tuple[str, dict[str, Any], list[str] | None]] = []
        for option in self.options:
            for choice in option.choices or ():
                cases.append((self.example_models[0], {option.name: choice}, None))
        return cases or [(self.example_models[0], {}, None)]

    # ---- options --------------------------------------------------------------------
    def parse_options(self, raw: Any) -> dict[str, Any]:
        """Validate and type ``raw`` (strings from the CLI are fine); fill in defaults."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InvalidType(f"options of {self.name} must be a mapping name -> value, "
                              f"got {type(raw).__name__}")
        known = {o.name: o for o in self.options}
        for key in raw:
            if key not in known:
                raise InvalidValue(str(unknown_name(f"option of {self.name}", str(key),
                                                    known or ["(none)"])))
        return {o.name: o.parse(raw[o.name], self.name) if o.name in raw else o.default
                for o in self.options}

    # ---- sites ----------------------------------------------------------------------
    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        """Whether this family converts sites like ``site`` (default: by site kind)."""
        return site.kind in self.site_kinds

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        """Why this family cannot convert this particular accepted site ("" when it can)."""
        return ""

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """The sites converted when the user names none (default: every candidate)."""
        return list(candidates)

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str,
              analysis: Analysis) -> None:
        """Refuse, before anything is built, what this family cannot do with ``sites``
        together (raise :class:`InfeasiblePlacement`)."""
        if init not in self.inits:
            raise InfeasiblePlacement(f"{self.name} does not support init {init!r} (--init "
                                      f"{init}); valid: {', '.join(self.inits)}")

    def idle_options(self, sites: Sequence[Site], options: dict[str, Any]) -> dict[str, str]:
        """Options that change nothing for ``sites`` with the other ``options`` (name ->
        why); :meth:`Analysis.select` refuses them when set away from their default."""
        return {}

    def refuse_idle(self, sites: Sequence[Site], options: dict[str, Any]) -> None:
        """Refuse an option set away from its default where it changes nothing: a user's
        conversion names one network under one placement key (the search would train it
        twice). Only new input is refused; saved plans and search trials keep loading."""
        defaults = {o.name: o.default for o in self.options}
        for name, why in self.idle_options(sites, options).items():
            if name in options and options[name] != defaults[name]:
                raise InfeasiblePlacement(f"option {name}={options[name]} of {self.name} "
                                          f"changes nothing here ({why}); drop it")

    def refuse_new(self, sites: Sequence[Site], options: dict[str, Any],
                   analysis: Analysis) -> None:
        """Refuse (raise :class:`InfeasiblePlacement`) what a family builds but no user
        should ask for anew, e.g. a width that rounds to 0 channels: new conversions,
        placement files and search spaces are refused; plans saved with it still load."""

    # ---- region and cost ------------------------------------------------------------
    def region(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Region:
        """What converting ``site`` replaces (default: the site itself)."""
        return analysis.region(site.name)

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        """Params/MACs/FLOPs of what replaces :meth:`region`, without building the model:
        by default the family's :meth:`build` on the meta device, counted on the site's
        input shape. Families that override :meth:`apply` count the edited network."""
        if type(self).apply is not Variant.apply or site.kind == "network":
            return analysis.applied_cost(self, site, options)
        module = analysis.meta_module(site)
        with torch.device("meta"):
            new = self.build(site, module, options, "scratch")
        if not is_builtin(self) and site.input_shape and site.call < 0:
            # (as building checks it: a cost is never predicted for what cannot be built)
            check_replacement(f"family {self.name!r} (from {type(self).__module__}) on site "
                              f"{site.name}", new, site)
        return count_replacement(new, site.input_shape)

    # ---- the pass -------------------------------------------------------------------
    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        """Convert ``site`` in the rewriter's model (default: one module for the site)."""
        rewriter.replace(site, self.build(site, rewriter.module(site), options, init))

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build() or apply()")

    # ---- masking --------------------------------------------------------------------
    def mask_modules(self, module: nn.Module, options: dict[str, Any]) -> list[nn.Module]:
        """The layers whose ``masked`` flag switches this site's higher-order part off
        (default: every layer of the family's leaf types inside ``module``)."""
        return [m for m in module.modules()
                if isinstance(m, self.leaf_modules) and hasattr(m, "masked")]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "site_kinds": list(self.site_kinds),
            "inits": list(self.inits),
            "mask": self.mask_effect,
            "options": [{"name": o.name, "default": o.default, "choices": list(o.choices)
                         if o.choices else None, "type": o.type.__name__, "min": o.min,
                         "min_inclusive": o.min_inclusive, "max": o.max,
                         "specials": list(o.specials), "help": o.help}
                        for o in self.options],
        }


def count_replacement(module: nn.Module, input_shape: Sequence[int]) -> Counts:
    """Totals of a replacement module on one input (no per-module breakdown)."""
    counts = count_module(module, input_shape, per_module=False)
    return Counts(param_count(module), counts.macs, counts.flops)


# ---- the registry ---------------------------------------------------------------------
_FAMILIES: dict[str, Variant] = {}
_loaders: list[Callable[[], None]] = []


def add_family_loader(loader: Callable[[], None]) -> None:
    """Run ``loader`` (which imports and registers families) before the first look-up."""
    _loaders.append(loader)


def _run_loaders() -> None:
    while _loaders:
        _loaders.pop(0)()


def register_family(variant: Variant | type[Variant], *, replace: bool = False) -> Variant:
    """Register a family (an instance or a class); returns the instance. A second family of
    the same name is refused unless ``replace``."""
    instance = variant() if isinstance(variant, type) else variant
    if not isinstance(instance, Variant):
        raise AutobuildError(f"register_variant takes a Variant subclass or instance, got "
                             f"{type(instance).__name__}")
    name = getattr(instance, "name", "")
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
        raise AutobuildError(f"a family needs a non-empty name without ':' (got {name!r})")
    options = [o.name for o in instance.options]
    if instance.primary_option is not None and instance.primary_option not in options:
        raise AutobuildError(f"family {name!r}: primary_option {instance.primary_option!r} "
                             f"names none of its options ({', '.join(options) or 'none'})")
    if name in _FAMILIES and not replace and type(_FAMILIES[name]) is not type(instance):
        raise AutobuildError(f"family {name!r} is already registered (by "
                             f"{type(_FAMILIES[name]).__module__}); pass replace=True to "
                             "replace it")
    for cls in instance.leaf_modules:
        register_leaf_module(cls)
    _FAMILIES[name] = instance
    return instance


def list_families() -> list[Variant]:
    _run_loaders()
    return list(_FAMILIES.values())


def is_builtin(variant: Variant) -> bool:
    """Whether ``variant`` is one of autobuild's own families (tested here), not one
    registered from outside."""
    return type(variant).__module__.startswith("autobuild.")


@contextlib.contextmanager
def own_errors(variant: Variant, site: Site) -> Iterator[str]:
    """Around a family's code: an exception a family registered from outside autobuild
    raises (not an :class:`AutobuildError`) becomes an error naming the family and the site,
    not an "internal error" of autobuild's. Yields how to name them."""
    where = f"family {variant.name!r} (from {type(variant).__module__}) on site {site.name}"
    if is_builtin(variant):
        yield where
        return
    try:
        yield where
    except AutobuildError:
        raise
    except Exception as exc:
        raise AutobuildError(f"{where} failed: {type(exc).__name__}: {brief(exc)}") from exc


def check_replacement(where: str, new: nn.Module, site: Site) -> None:
    """Refuse a module (a family's from outside autobuild) that fails on the site's input
    or changes the site's output shape, naming ``where`` (the family and the site)."""
    try:
        shape = run_on_meta(new, site.input_shape, lambda m, x: tuple(m(x).shape[1:]))
    except Exception as exc:
        raise AutobuildError(f"{where}: its {type(new).__name__} fails on the site's input "
                             f"{tuple(site.input_shape)}: {type(exc).__name__}: "
                             f"{brief(exc)}") from exc
    if shape != tuple(site.output_shape):
        raise AutobuildError(f"{where}: its {type(new).__name__} outputs {shape} per "
                             f"sample, the site {tuple(site.output_shape)}; a replacement "
                             "must keep the site's output shape")


def get_family(name: Any) -> Variant:
    if not isinstance(name, str):
        raise InvalidType(f"a family is named by a string, got {name!r}")
    _run_loaders()
    key = name.replace("_", "-")
    if key in _FAMILIES:
        return _FAMILIES[key]
    if name in _FAMILIES:
        return _FAMILIES[name]
    raise unknown_name("family", name, _FAMILIES,
                       "`autobuild variants` describes them; a family of your own is "
                       "registered first: autobuild.register_variant, or --import MODULE on "
                       "the command line")
