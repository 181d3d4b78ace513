"""Structure found in a traced graph: call sites, module membership, activations and residual
blocks (one definition of "a residual addition" for the whole project)."""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["Block", "ACTIVATION_MODULES", "ancestors", "call_site_nodes", "find_blocks",
           "is_activation", "is_residual_add", "module_members", "node_shape",
           "through_identity"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Mish)
_ACTIVATION_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                         torch.nn.functional.silu, torch.nn.functional.gelu}
_ACTIVATION_METHODS = {"relu", "relu_"}


def is_residual_add(node: fx.Node) -> bool:
    """``a + b``, ``a += b``, ``torch.add(a, b)`` or ``a.add(b)`` of two graph values."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return False
    return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2


def is_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def node_shape(node: object) -> tuple[int, ...]:
    """The recorded output shape of ``node`` without the batch dimension (() if unknown)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return ()
    return tuple(int(s) for s in meta.shape[1:])


def call_site_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Each call-site name (``target``, or ``target#k`` for a module called k>1 times) to
    its call_module node."""
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    out: dict[str, fx.Node] = {}
    for target, nodes in calls.items():
        if len(nodes) == 1:
            out[target] = nodes[0]
        else:
            for k, node in enumerate(nodes):
                out[f"{target}#{k}"] = node
    return out


def module_members(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """Module path -> the graph nodes traced inside it, at any depth ("" holds every node)."""
    out: dict[str, set[fx.Node]] = defaultdict(set)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        out[""].add(node)
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            out[path].add(node)
        if node.op == "call_module":  # a leaf call belongs to its own module too
            out[str(node.target)].add(node)
    return dict(out)


def ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    """``node`` and everything it depends on, not looking past the nodes in ``stop``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            todo.extend(n.all_input_nodes)
    return seen


def through_identity(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Follow calls of nn.Identity back to their input (CIFAR blocks call one as shortcut)."""
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node


@dataclass
class Block:
    """A residual block: module ``path`` computes ``output = act?(branch + shortcut)`` from
    its single input. ``shortcut`` is "identity" or "projection"."""

    path: str
    input: fx.Node
    output: fx.Node
    add: fx.Node
    branch: fx.Node
    shortcut_value: fx.Node
    shortcut: str
    members: frozenset[fx.Node]


def _block_of(path: str, nodes: set[fx.Node], gm: fx.GraphModule) -> Block | None:
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
    tensor_inputs = [a for a in inputs if a.op != "get_attr"]
    outputs = [n for n in nodes if any(u not in nodes for u in n.users)]
    if len(tensor_inputs) != 1 or len(outputs) != 1:
        return None
    x, out = tensor_inputs[0], outputs[0]
    add = out
    if not is_residual_add(add) and add.all_input_nodes and is_activation(add, gm):
        add = add.all_input_nodes[0]
    if not is_residual_add(add) or add not in nodes:
        return None
    a, b = (v for v in add.args[:2])
    anc_a, anc_b = ancestors(a, {x}), ancestors(b, {x})
    if x not in anc_a or x not in anc_b:
        return None
    # Branch and shortcut may share a pre-activation, but not an earlier residual add: that
    # would make this module a stage (several blocks), not one block.
    if any(is_residual_add(n) for n in (anc_a & anc_b) - {x}):
        return None
    # The shortcut is the operand with the shorter path from the input.
    branch, short = (a, b) if len(anc_a & nodes) >= len(anc_b & nodes) else (b, a)
    kind = "identity" if through_identity(short, gm) is x else "projection"
    return Block(path, x, out, add, branch, short, kind, frozenset(nodes))


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """Residual blocks, found by structure rather than by class, in graph order. A
    one-block nn.Sequential has the same structure as its block: the inner one is kept."""
    members = module_members(gm)
    found = [b for path, nodes in members.items() if path
             for b in [_block_of(path, nodes, gm)] if b is not None]
    innermost: dict[fx.Node, Block] = {}
    for block in found:
        if block.add not in innermost or len(block.path) > len(innermost[block.add].path):
            innermost[block.add] = block
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(innermost.values(), key=lambda b: order[b.add])
