"""The library's front door: analyse a baseline, convert it, list its sites, rebuild a plan.

These functions resolve baseline names through the model registry and hand the work to the
engine (:class:`~autobuild.rewrite.Analysis`); they hold no conversion logic of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autobuild.errors import (
    AutobuildError,
    InfeasiblePlacement,
    InvalidType,
    InvalidValue,
    check_seed,
    in_context,
    unknown_name,
)
from autobuild.models import get_model_entry, resolve_baseline
from autobuild.rewrite import (
    INITS,
    Analysis,
    Baseline,
    BuildRecord,
    Placement,
    Plan,
    Site,
    get_family,
    plan_of,
    record_of,
    set_plan,
    set_record,
)
from autobuild.rewrite.record import unwrap
from autobuild.rewrite.sites import Region

__all__ = ["analyze", "build_plan", "check_plan_leaves", "convert", "sites"]


def analyze(model_or_name: nn.Module | str, *, num_classes: int | None = None,
            input_size: Sequence[int] | None = None, weights: str | None = None,
            leaf_modules: Iterable[Any] = (),
            model_args: Mapping[str, Any] | None = None) -> Analysis:
    """Trace a baseline (a registered name or any traceable nn.Module) once: shapes, costs
    and every site of every kind. ``leaf_modules`` (classes, class names or qualified names)
    are kept opaque by torch.fx, for code it cannot trace. ``model_args`` go to a named
    baseline's builder (:data:`autobuild.models.MODEL_ARGS`, e.g. ``drop_path_rate``)."""
    baseline = resolve_baseline(model_or_name, num_classes=num_classes, input_size=input_size,
                                weights=weights, leaf_modules=_leaves(leaf_modules),
                                model_args=model_args)
    _check_leaf_names(baseline)
    return Analysis(baseline)


def _check_leaf_names(baseline: Baseline) -> None:
    """A leaf named by a string must be a module of the traced root, by qualified name or
    class name: a misspelt one would keep nothing opaque, silently."""
    names = [m for m in baseline.leaf_modules if isinstance(m, str)]
    if not names:
        return
    modules = dict(baseline.root_module.named_modules())
    known = set(modules) | {type(m).__name__ for m in modules.values()}
    for name in names:
        if name not in known:
            raise unknown_name("leaf module", name, [q for q in modules if q],
                               "a qualified module name or a class name of the model",
                               shown=20)


def check_plan_leaves(baseline: Baseline) -> None:
    """A plan the user hands in (``--plan``): a misspelt leaf in a hand-edited one would be
    traced through, so it is refused, naming the plan key. (Not on ``load``: a plan records
    a leaf class by name, and a class the model has no instance of is a harmless no-op.)"""
    try:
        _check_leaf_names(baseline)
    except AutobuildError as exc:
        raise in_context(exc, f"plan leaf_modules: {exc}") from None


def _leaves(leaf_modules: Any) -> tuple[Any, ...]:
    if isinstance(leaf_modules, (str, type)):
        return (leaf_modules,)
    try:
        leaves = tuple(leaf_modules)
    except TypeError:
        raise InvalidType(f"leaf_modules must be a list of classes or names, got "
                          f"{leaf_modules!r}") from None
    for m in leaves:
        if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module))):
            raise InvalidType(f"leaf_modules takes nn.Module classes or names, got {m!r}")
    return leaves


def _check_init(init: Any) -> str:
    if init not in INITS:
        raise InvalidValue(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    return init


def _check_types(sites: Any, options: Any, placement: Any) -> None:
    """The conversion arguments' types, before any of them is used."""
    if sites is not None and not isinstance(sites, (str, list, tuple)):
        raise InvalidType(f"sites must be a glob pattern or a list of them, got "
                          f"{type(sites).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise InvalidType(f"options must be a mapping name -> value, got "
                          f"{type(options).__name__}")
    if placement is not None and not isinstance(placement, Mapping):
        raise InvalidType(f"a placement maps site names to choices, got "
                          f"{type(placement).__name__}")


def _placement(analysis: Analysis, to: str | None, sites: Any, options: Any,
               placement: Placement | Mapping[str, Any] | None) -> Placement:
    _check_types(sites, options, placement)
    if placement is not None:
        if to is not None or sites is not None or options is not None:
            raise InvalidValue("pass either placement= or to=/sites=/options=, not both")
        placement = placement if isinstance(placement, Placement) else Placement(placement)
        analysis.check_new(placement)
        return placement
    if to is None:
        raise InvalidValue("name a family with to= (see `autobuild variants`) or pass a "
                           "placement=")
    return analysis.select(to, sites, options)


def convert(model_or_name: nn.Module | str, to: str | None = None, *,
            sites: Iterable[str] | str | None = None, options: Mapping[str, Any] | None = None,
            placement: Placement | Mapping[str, Any] | None = None, init: str = "scratch",
            num_classes: int | None = None, input_size: Sequence[int] | None = None,
            weights: str | None = None, leaf_modules: Iterable[Any] = (),
            model_args: Mapping[str, Any] | None = None, seed: int | None = None
            ) -> nn.Module:
    """Convert a baseline with family ``to`` (on the sites matching the glob patterns
    ``sites``, default the family's default sites, with ``options``) or with a mixed
    ``placement``. ``init`` is "scratch" or "preserve" (the converted model computes the
    baseline's function). A model autobuild already converted is converted further: its
    plan then holds both conversions. The result carries its plan (:func:`plan_of`).
    ``seed``: the new layers are drawn right after ``torch.manual_seed(seed)``, and a
    named baseline is built right after it too, as ``autobuild train --seed`` and a search
    trial build them (this sets torch's global random state)."""
    _check_init(init)
    if seed is not None:
        check_seed(seed)
    if isinstance(model_or_name, nn.Module) and plan_of(model_or_name) is not None:
        if any(v is not None for v in (num_classes, input_size, weights, model_args)):
            raise InvalidValue("num_classes/input_size/weights/model_args describe a "
                               "baseline; a converted model keeps those of its plan")
        return _convert_again(model_or_name, to, sites, options, placement, init, seed)
    if seed is not None:
        torch.manual_seed(seed)
    analysis = analyze(model_or_name, num_classes=num_classes, input_size=input_size,
                       weights=weights, leaf_modules=leaf_modules, model_args=model_args)
    return analysis.build(_placement(analysis, to, sites, options, placement), init,
                          seed=seed)


def _trace_root(plan: Plan) -> str:
    return "" if plan.model.startswith("custom:") else get_model_entry(plan.model).trace_root


def _convert_again(model: nn.Module, to: str | None, sites: Any, options: Any,
                   placement: Any, init: str, seed: int | None) -> nn.Module:
    """Convert more sites of a converted model, on the model as it is (its weights kept)."""
    _check_types(sites, options, placement)
    record = record_of(model)
    plan = record.plan
    base = Baseline(model, plan.model, plan.input_size or (3, 224, 224), _trace_root(plan),
                    plan.num_classes, plan.weights, tuple(plan.leaf_modules), plan.model_args)
    named = [sites] if isinstance(sites, str) else list(sites or [])
    named += list(placement or {})
    for name in named:
        if name in plan.placement:
            raise InfeasiblePlacement(f"site {name} is already converted "
                                      f"({plan.placement[name].short()})")
    analysis = Analysis(base)
    new = _placement(analysis, to, sites, options, placement)
    merged = plan.placement.merged(new)
    both = "preserve" if init == plan.init == "preserve" else "scratch"
    if plan.model.startswith("custom:"):  # (no baseline to analyse: the model's paths tell)
        _refuse_converted_inside(model, analysis, new, record)
    else:  # the combined plan must be one that builds, as load() will build it
        Analysis(plan_baseline(plan, load_baseline_weights=False, device="meta")).check(
            merged, both)
    built = analysis.build(new, init, seed=seed)
    added = record_of(built)
    set_record(built, BuildRecord(plan.replace(placement=merged, init=both),
                                  {**record.site_modules, **added.site_modules},
                                  record.changes + added.changes, record.root))
    return built


def _refuse_converted_inside(model: nn.Module, analysis: Analysis, new: Placement,
                             record: BuildRecord) -> None:
    """Refuse a new site whose region holds, or lies in, a converted module."""
    built = _converted_modules(model, record)
    for name, choice in new.items():
        region = get_family(choice.family).region(analysis.site(name), choice.opts, analysis)
        for path, old in built.items():
            if Region(modules=frozenset({path})).overlaps(region):
                raise InfeasiblePlacement(
                    f"sites {old} ({record.plan.placement[old].short()}) and {name} "
                    f"({choice.short()}) overlap: one lies inside what the other replaces; a "
                    "placement takes one of them")


def _converted_modules(model: nn.Module, record: BuildRecord) -> dict[str, str]:
    """Module path -> the site whose conversion built it: the site's module when it is one
    of its family's layers (or holds none), else the family's layers inside it (a plain
    pde-global stage keeps its first block, which another choice may still convert)."""
    root = unwrap(model)
    built: dict[str, str] = {}
    for old, path in record.site_modules.items():
        layers = get_family(record.plan.placement[old].family).leaf_modules
        try:
            module = root.get_submodule(path)
        except AttributeError:  # (a graph edit recorded elsewhere: the whole path is taken)
            built[path] = old
            continue
        inner = [f"{path}.{n}".lstrip(".") for n, m in module.named_modules()
                 if n and isinstance(m, layers)]
        for taken in ([path] if not path or isinstance(module, layers) or not inner
                      else inner):
            built[taken] = old
    return built


def sites(model_or_name: nn.Module | str, to: str | None = None, *,
          options: Mapping[str, Any] | None = None, num_classes: int | None = None,
          input_size: Sequence[int] | None = None, leaf_modules: Iterable[Any] = (),
          model_args: Mapping[str, Any] | None = None) -> list[Site]:
    """The sites of a baseline that family ``to`` can convert (every site without ``to``),
    with shapes and costs."""
    analysis = analyze(model_or_name, num_classes=num_classes, input_size=input_size,
                       leaf_modules=leaf_modules, model_args=model_args)
    return analysis.sites(to, options)


def plan_baseline(plan: Plan, baseline: nn.Module | None = None, *,
                  load_baseline_weights: bool = True, device: str | None = None) -> Baseline:
    """The baseline a plan names (custom baselines must be passed as ``baseline``)."""
    if plan.model.startswith("custom:"):
        if baseline is None:
            raise AutobuildError(f"plan is for a custom model ({plan.model}); pass the baseline "
                                 "module (autobuild.load(dir, baseline=module))")
        return resolve_baseline(baseline, num_classes=plan.num_classes,
                                input_size=plan.input_size, leaf_modules=plan.leaf_modules)
    if baseline is not None:
        get_model_entry(plan.model)  # (not registered in this process: says how to)
        raise AutobuildError(f"plan is for the registered model {plan.model}, which it builds "
                             "itself; baseline= is for a plan of a custom model")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidValue(f"unknown device {device!r}; valid: e.g. cpu, cuda, cuda:1, "
                               "meta") from None
    weights = plan.weights if load_baseline_weights else None
    return resolve_baseline(plan.model, num_classes=plan.num_classes, input_size=plan.input_size,
                            weights=weights, leaf_modules=plan.leaf_modules, device=device,
                            model_args=plan.model_args)


def build_plan(plan: Plan, baseline: nn.Module | None = None, *,
               load_baseline_weights: bool = True, device: str | None = None,
               seed: int | None = None) -> nn.Module:
    """Rebuild the model a plan describes. ``device="meta"`` builds the structure only (no
    weights allocated or initialised), for loading saved weights into it. ``seed``: the
    baseline and then the new layers are each built right after ``torch.manual_seed(seed)``
    (the initial weights of a search trial, or of ``autobuild train --seed``)."""
    if not isinstance(plan, Plan):
        raise InvalidType(f"build_plan() takes a Plan (autobuild.Plan.from_dict, Plan.loads, "
                          f"or plan_of(model)), got {type(plan).__name__}")
    if seed is not None:
        torch.manual_seed(check_seed(seed))
    base = plan_baseline(plan, baseline, load_baseline_weights=load_baseline_weights,
                         device=device)
    analysis = Analysis(base)
    where = torch.device(device) if device else contextlib.nullcontext()
    with where:
        model = analysis.build(plan.placement, plan.init, seed=seed)
    built = plan_of(model)
    if built is not None and built.weights != plan.weights:  # (built without them)
        set_plan(model, built.replace(weights=plan.weights))
    return model
