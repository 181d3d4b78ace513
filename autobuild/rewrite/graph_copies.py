"""Keep what autobuild adds to a GraphModule (its class name, its build record) through
``copy.deepcopy`` and pickling. torch.fx rebuilds both copies from the graph or the code: the
copy is named ``GraphModule`` and, after pickling, its ``meta`` is new, so the record would be
dropped by the next deepcopy (``train``'s EMA copy, for one)."""

from __future__ import annotations

from typing import Any

from torch import fx

__all__ = ["keep_identity"]

_CLASS_NAME = "autobuild_class_name"


def keep_identity(gm: fx.GraphModule) -> None:
    """Make deep copies and unpickled copies of ``gm`` keep its class name and the attributes
    listed in its ``meta`` (torch.fx's user-preserved attributes: the build record)."""
    gm.meta.setdefault(_CLASS_NAME, type(gm).__name__)
    type(gm).__name__ = gm.meta[_CLASS_NAME]
    # Private torch.fx hooks; were they gone, copies would only lose the class name and,
    # after pickling, the record.
    hooks = getattr(gm, "_deepcopy_hooks", None)
    register = getattr(gm, "_register_deepcopy_hook", None)
    if register is not None and hooks is not None and keep_identity not in hooks:
        register(keep_identity)
    # Every GraphModule has a class of its own, so this changes only how ``gm`` pickles.
    type(gm).__reduce__ = _reduce


def _reduce(gm: fx.GraphModule) -> tuple[Any, ...]:
    rebuild, args = fx.GraphModule.__reduce__(gm)
    return _unpickle, (rebuild, args)


def _unpickle(rebuild: Any, args: tuple[Any, ...]) -> fx.GraphModule:
    gm = rebuild(*args)
    # torch.fx restores the pickled attributes that the new module lacks; ``meta`` it has.
    gm.meta.update(args[0].get("meta", {}))
    keep_identity(gm)
    return gm
