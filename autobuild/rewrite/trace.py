"""torch.fx tracing with autobuild's leaf modules and errors a user can act on."""

from __future__ import annotations

import linecache
import os
import traceback
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from autobuild.errors import AutobuildError

__all__ = ["AutobuildTracer", "leaf_module_types", "shape_propagate", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)


def leaf_module_types() -> tuple[type[nn.Module], ...]:
    """Modules fx must not trace into: every registered family's layers (so a converted
    model can be traced again and its converted layers are recognised as such)."""
    from autobuild.variants import list_variants

    types: list[type[nn.Module]] = []
    for variant in list_variants():
        types.extend(variant.leaf_modules)
    return tuple(types)


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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm


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


@torch.no_grad()
def shape_propagate(gm: fx.GraphModule, input_size: tuple[int, ...]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running a random input.

    Runs in eval mode so that batch-norm statistics are neither needed nor changed.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        param = next(iter(gm.parameters()), None)
        device = param.device if param is not None else "cpu"
        x = torch.randn(1, *input_size, device=device)
        ShapeProp(gm).propagate(x)
    except AutobuildError:
        raise
    except Exception as exc:
        raise AutobuildError(f"the model does not run on input size {tuple(input_size)}: "
                             f"{str(exc).splitlines()[0]} (pass --input-size C,H,W)") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
