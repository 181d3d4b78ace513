"""A baseline to convert, and the one run of its traced graph that annotates every node with
its output shape and its own MACs/FLOPs (on the meta device where the model allows it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from autobuild.errors import AutobuildError
from autobuild.rewrite.cost import CostCounter, run_on_meta

__all__ = ["Baseline", "annotate"]


@dataclass
class Baseline:
    """A baseline module plus what a plan needs to rebuild it."""

    module: nn.Module
    name: str
    input_size: tuple[int, int, int]
    #: The submodule that is traced and converted ("" = the model; detectors: "backbone").
    root: str = ""
    num_classes: int | None = None
    weights: str | None = None
    #: Module classes (or class names / qualified names) fx keeps opaque.
    leaf_modules: tuple[Any, ...] = ()
    #: The arguments the named baseline was built with (e.g. ``drop_path_rate``).
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def root_module(self) -> nn.Module:
        return self.module.get_submodule(self.root) if self.root else self.module

    def leaf_names(self) -> list[str]:
        return [m.__name__ if isinstance(m, type) else str(m) for m in self.leaf_modules]


class _Annotator(fx.Interpreter):
    """Runs the graph once, recording each node's output shape and its own MACs/FLOPs."""

    def __init__(self, gm: fx.GraphModule, counter: CostCounter) -> None:
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        self.counter.stack = [n.name]
        try:
            result = super().run_node(n)
        finally:
            self.counter.stack = []
        meta = map_aggregate(result, lambda v: _extract_tensor_metadata(v)
                             if isinstance(v, torch.Tensor) else v)
        if isinstance(result, torch.Tensor) or (isinstance(result, (tuple, list)) and any(
                isinstance(v, torch.Tensor) for v in result)):
            n.meta["tensor_meta"] = meta
        return result


def annotate(gm: fx.GraphModule, input_size: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Shapes on every node of ``gm`` and (MACs, FLOPs) per node name, from one run on the
    meta device (or, for a model that cannot run there, one real run with batch 1)."""

    def run(module: nn.Module, x: torch.Tensor) -> tuple[dict, CostCounter]:
        counter = CostCounter()
        with counter, torch.no_grad():
            _Annotator(module, counter).run(x)
        return {n.name: n.meta.get("tensor_meta") for n in module.graph.nodes}, counter

    try:
        shapes, counter = run_on_meta(gm, input_size, run)
    except AutobuildError:
        raise
    except Exception as exc:
        raise AutobuildError(f"the model does not run on input size {tuple(input_size)}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             " (pass --input-size C,H,W)") from exc
    for node in gm.graph.nodes:
        if shapes.get(node.name) is not None:
            node.meta["tensor_meta"] = shapes[node.name]
    return {name: (counter.macs.get(name, 0), counter.flops.get(name, 0))
            for name in shapes}
