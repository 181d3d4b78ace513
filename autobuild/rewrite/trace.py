"""torch.fx tracing with autobuild's leaf modules and errors a user can act on."""

from __future__ import annotations

import functools
import inspect
import linecache
import os
import traceback
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from autobuild.errors import AutobuildError, InvalidType

__all__ = ["AutobuildTracer", "leaf_module_types", "register_leaf_module", "runtime_training",
           "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)

#: Module classes fx must not trace into: every family's layers, registered by the family
#: (as timm's ``register_notrace_module``), so that a converted model traces again and its
#: converted layers are recognised as such.
_LEAF_TYPES: list[type[nn.Module]] = []


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Keep ``cls`` opaque to torch.fx in every trace (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidType(f"register_leaf_module takes an nn.Module class, got {cls!r}")
    if cls not in _LEAF_TYPES:
        _LEAF_TYPES.append(cls)
    return cls


def leaf_module_types() -> tuple[type[nn.Module], ...]:
    return tuple(_LEAF_TYPES)


#: Modules (by module and class name, so that nothing is imported) whose forward decides in
#: Python, from ``self.training``, what to compute: traced through, the trace-time branch
#: would stay for ever (timm's drop path in eval). Kept opaque, they switch with the model.
_MODE_BRANCHING = {("timm.layers.drop", "DropPath"), ("timm.layers.drop", "DropBlock2d")}


class AutobuildTracer(fx.Tracer):
    """A tracer whose leaves are torch.nn's layers, the families' layers and any extra
    module types or qualified names the user passes; it remembers which module it was in
    so that a failure can name it."""

    def __init__(self, leaf_types: Iterable[type[nn.Module]] = (),
                 leaf_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = set(leaf_names)
        self.path: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        if (type(m).__module__, type(m).__name__) in _MODE_BRANCHING:
            return True
        if type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module, before the stack unwinds
                self.failed_in = list(self.path)
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module, *, leaf_modules: Iterable[Any] = (), name: str = "") -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its submodules and parameters.

    ``leaf_modules`` are extra module types, class names or qualified names to keep opaque.
    """
    types = [m for m in leaf_modules if isinstance(m, type)]
    names = [m for m in leaf_modules if isinstance(m, str)]
    tracer = AutobuildTracer(leaf_module_types() + tuple(types), names)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise AutobuildError(_describe_failure(exc, tracer, name or type(model).__name__)) from exc
    runtime_training(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm


def _training_index(target: Any) -> int | None:
    """The position of ``target``'s parameter named ``training`` (None without one)."""
    try:
        return _cached_training_index(target)
    except TypeError:  # an unhashable callable
        return _cached_training_index.__wrapped__(target)


@functools.lru_cache(maxsize=1024)  # (one signature per function, not one per call)
def _cached_training_index(target: Any) -> int | None:
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return names.index("training") if "training" in names else None


def _needs_batch_statistics(node: fx.Node) -> bool:
    """A norm called without running statistics (``track_running_stats=False``) normalises
    with the batch's in eval too: its constant ``training=True`` is deliberate."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return "running_mean" in bound.arguments and bound.arguments["running_mean"] is None


def runtime_training(graph: fx.Graph) -> int:
    """Give the functions called with ``training=<the flag at trace time>`` (F.batch_norm and
    F.dropout inside modules fx traces through, torchvision's stochastic depth, ...) the
    module's flag at run time instead, so that ``.eval()`` and ``.train()`` still switch
    them. fx evaluates ``self.training`` while tracing: without this, a graph traced in
    training mode keeps batch statistics and dropout on in eval. Returns how many calls
    changed."""
    flag: fx.Node | None = None
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        index = _training_index(node.target)
        if index is None:
            continue
        if "training" in node.kwargs and isinstance(node.kwargs["training"], bool):
            where = "kwarg"
        elif index < len(node.args) and isinstance(node.args[index], bool):
            where = "arg"
        else:
            continue
        if _needs_batch_statistics(node):
            continue
        if flag is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                flag = graph.get_attr("training")
        if where == "kwarg":
            node.update_kwarg("training", flag)
        else:
            node.update_arg(index, flag)
        changed += 1
    return changed


def _describe_failure(exc: Exception, tracer: AutobuildTracer, model_name: str) -> str:
    where = ""
    # The innermost frame outside torch is the user's line that fx could not trace.
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not frame.filename.startswith(_TORCH_DIR):
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{code}`"
            break
    module = ""
    remedy_target = "the failing module"
    if tracer.failed_in:
        qual, cls = tracer.failed_in[-1]
        module = f" in module {qual or '<root>'!r} ({cls})"
        remedy_target = f"{qual!r} (or the class {cls})" if qual else remedy_target
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"cannot trace {model_name} with torch.fx{module}{where}: {reason}. Fix: keep "
            f"{remedy_target} opaque with leaf_modules=[...] (Python API), or convert a "
            "traceable submodule instead (for detectors, the 'backbone')")
