"""What a built model remembers about how it was built: its plan, where each site ended up,
and the record of changes. One attribute, read and written only here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from autobuild.rewrite.graph_copies import keep_identity

if TYPE_CHECKING:
    from autobuild.rewrite.plan import Plan

__all__ = ["DROPPED", "BuildRecord", "Change", "plan_of", "record_of", "root_of", "set_plan",
           "set_record", "site_modules", "unwrap", "without_dropped"]

_ATTR = "_autobuild"


@dataclass
class Change:
    """One entry of a build's record: what replaced what, where."""

    site: str
    family: str
    before: str
    after: str
    params_before: int = 0
    params_after: int = 0
    note: str = ""


@dataclass
class BuildRecord:
    """``plan``: what the model was built from. ``site_modules``: site name -> the module
    path it became in the built model ("" = the model itself). ``changes``: what changed.
    ``root``: the traced submodule conversions apply to ("" = the model; detectors:
    "backbone")."""

    plan: Plan
    site_modules: dict[str, str] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    root: str = ""


def unwrap(model: Any) -> Any:
    """The module under torch.compile (``_orig_mod``) and DDP/DataParallel (``module``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def record_of(model: Any) -> BuildRecord | None:
    """The build record of a model autobuild built (None otherwise)."""
    return getattr(unwrap(model), _ATTR, None)


def set_record(model: nn.Module, record: BuildRecord) -> None:
    # object.__setattr__: a plain attribute, never a submodule, parameter or state_dict entry.
    model = unwrap(model)
    object.__setattr__(model, _ATTR, record)
    if isinstance(model, fx.GraphModule):  # its deepcopy rebuilds it from the graph: the
        # attributes it restores are those listed here (torch.fx's user-preserved ones)
        model.meta.setdefault(_PRESERVED, {})[_ATTR] = record
        keep_identity(model)


#: torch.fx.graph_module's key: GraphModule.__deepcopy__ sets these attributes on the copy.
_PRESERVED = "_user_preserved_attributes"


#: A :class:`Change`'s ``after`` for a module the build deleted (a shared module every call
#: of which was converted; ``site`` is its path).
DROPPED = "(dropped)"


def without_dropped(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the entries of modules ``model``'s build dropped: weights saved by
    a version that kept them (as dead weight) still load."""
    record = record_of(model)
    dropped = [c.site + "." for c in (record.changes if record else []) if c.after == DROPPED]
    if not dropped:
        return state
    return {k: v for k, v in state.items() if not any(k.startswith(p) for p in dropped)}


def plan_of(model: Any) -> Plan | None:
    """The plan a converted model was built from (None for a model autobuild did not build)."""
    record = record_of(model)
    return record.plan if record is not None else None


def set_plan(model: nn.Module, plan: Plan) -> None:
    """Give ``model`` a plan (keeping its site map and changes when it has a record)."""
    record = record_of(model)
    if record is None:
        set_record(model, BuildRecord(plan))
    else:
        record.plan = plan


def site_modules(model: Any) -> dict[str, str]:
    """Site name -> qualified module name it became in ``model`` ({} when unknown)."""
    record = record_of(model)
    return dict(record.site_modules) if record is not None else {}


def root_of(model: Any) -> nn.Module:
    """The traced root of a built model (the model itself, or e.g. a detector's backbone)."""
    record = record_of(model)
    model = unwrap(model)
    return model.get_submodule(record.root) if record is not None and record.root else model
