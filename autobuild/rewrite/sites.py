"""Candidate sites: the places in a traced network where a family can put its blocks.

Kinds:
  ``conv``    one Conv2d *call* (a module called twice is two sites, ``name#0``/``name#1``);
              ``bn``/``act`` name the batch norm and activation that directly follow it.
  ``linear``  one Linear call.
  ``block``   a residual block: a module whose output is ``act?(branch(x) + shortcut(x))``.
  ``stage``   an nn.Sequential whose children are all residual blocks.
  ``attention`` a self-attention module: found by structure, a module with one tensor input
              and one output whose graph contains ``scaled_dot_product_attention`` or a
              softmax fed by a Linear/Conv projection inside it (the innermost such module,
              e.g. timm's ``blocks.3.attn``), or a leaf module a registered predicate
              accepts (:func:`register_attention`). Shapes are (tokens, dim).
  ``network`` the whole traced root (families that rebuild or rewire the network).

Each site comes with its :class:`Region`: the graph nodes it covers and the modules it
owns, which is what two choices of a placement must not share.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autobuild.errors import InfeasiblePlacement, InvalidType
from autobuild.rewrite.cost import param_count
from autobuild.rewrite.graph import (
    Block,
    call_site_nodes,
    is_activation,
    is_residual_add,
    module_members,
    node_shape,
)

__all__ = ["SITE_KINDS", "Region", "Site", "find_sites", "register_attention", "select_sites"]

SITE_KINDS = ("conv", "linear", "block", "stage", "attention", "network")

#: The ops that make a module an attention: softmax over scores, or the fused kernel.
_ATTENTION_FUNCTIONS = {torch.nn.functional.scaled_dot_product_attention, torch.softmax,
                        torch.nn.functional.softmax}
_ATTENTION_METHODS = {"softmax"}
#: Predicates for opaque (leaf) attention modules whose graph the tracer does not see.
_ATTENTION_PREDICATES: list[Callable[[nn.Module], bool]] = []


def register_attention(predicate: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    """Declare leaf modules that are self-attentions (``predicate(module)`` is true): each
    call with one tensor input becomes an ``attention`` site. Structure finds traced ones."""
    _ATTENTION_PREDICATES.append(predicate)
    return predicate


@dataclass(frozen=True)
class Site:
    """One place a family can convert. ``name`` is unique and stable: it is what plans store.

    ``target`` is the module's qualified name in the model ("" for the whole network);
    ``call`` the index of this call among the module's calls (-1 when called once).
    Shapes exclude the batch dimension; ``params``, ``macs`` and ``flops`` are the site's own.
    """

    name: str
    kind: str
    target: str
    module_type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = ()
    stride: int = 1
    groups: int = 1
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    params: int = 0
    macs: int = 0
    call: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    flops: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kernel_size"] = list(self.kernel_size)
        d["input_shape"] = list(self.input_shape)
        d["output_shape"] = list(self.output_shape)
        return d

    @property
    def depth(self) -> int:
        """Nesting depth of the site's module (the network is 0)."""
        return 0 if self.kind == "network" else self.target.count(".") + 1


@dataclass(frozen=True)
class Region:
    """What a site covers: graph ``nodes`` (names in the analysis graph) and the ``modules``
    (qualified names, whole subtrees) a conversion of it replaces."""

    nodes: frozenset[str] = frozenset()
    modules: frozenset[str] = frozenset()

    def __or__(self, other: Region) -> Region:
        return Region(self.nodes | other.nodes, self.modules | other.modules)

    def overlaps(self, other: Region) -> bool:
        if self.nodes & other.nodes:
            return True
        return any(_nested(a, b) or _nested(b, a) for a in self.modules for b in other.modules)


def _nested(outer: str, inner: str) -> bool:
    return outer == inner or outer == "" or inner.startswith(outer + ".")


NodeCosts = Mapping[fx.Node, tuple[int, int]]


def _sum_costs(nodes: Iterable[fx.Node], costs: NodeCosts) -> tuple[int, int]:
    macs = flops = 0
    for n in nodes:
        m, f = costs.get(n, (0, 0))
        macs, flops = macs + m, flops + f
    return macs, flops


def _conv_site(name: str, node: fx.Node, gm: fx.GraphModule, call: int,
               costs: NodeCosts) -> tuple[Site, Region]:
    m = gm.get_submodule(node.target)
    in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
    # The stem reads the network input; QuadraLib leaves it first-order.
    extra: dict[str, Any] = {"stem": isinstance(node.args[0], fx.Node)
                             and node.args[0].op == "placeholder"}
    user = next(iter(node.users)) if len(node.users) == 1 else None
    out = node  # the layer's output: the conv's, or its BN's
    if user is not None and user.op == "call_module" and isinstance(
            gm.get_submodule(user.target), nn.modules.batchnorm._BatchNorm):
        extra["bn"] = str(user.target)
        out = user
        user = next(iter(user.users)) if len(user.users) == 1 else None
    # The last layer of a residual branch (a basic block's second conv): its output is added
    # to the shortcut as it is.
    extra["into_add"] = any(is_residual_add(u) for u in out.users)
    if user is not None and is_activation(user, gm):
        extra["act"] = (str(user.target) if user.op == "call_module"
                        else f"fn:{getattr(user.target, '__name__', user.target)}")
    macs, flops = costs.get(node, (0, 0))
    region = Region(frozenset({node.name}), frozenset() if call >= 0 else frozenset({node.target}))
    if isinstance(m, nn.Conv2d):
        site = Site(name, "conv", str(node.target), type(m).__name__, m.in_channels,
                    m.out_channels, tuple(m.kernel_size), int(m.stride[0]), m.groups, in_shape,
                    out_shape, param_count(m), macs, call, extra, flops)
    else:
        site = Site(name, "linear", str(node.target), type(m).__name__, m.in_features,
                    m.out_features, (), 1, 1, in_shape, out_shape, param_count(m), macs, call,
                    extra, flops)
    return site, region


def _block_site(block: Block, root: nn.Module, costs: NodeCosts) -> tuple[Site, Region]:
    module = root.get_submodule(block.path)
    in_shape, out_shape = node_shape(block.input), node_shape(block.output)
    # Ceiling division: a stride-2 block maps 7x7 to 4x4.
    stride = (max(1, -(-in_shape[-1] // out_shape[-1]))
              if len(in_shape) == 3 and len(out_shape) == 3 else 1)
    macs, flops = _sum_costs(block.members, costs)
    site = Site(block.path, "block", block.path, type(module).__name__,
                in_shape[0] if in_shape else 0, out_shape[0] if out_shape else 0, (), stride, 1,
                in_shape, out_shape, param_count(module), macs, -1,
                {"shortcut": block.shortcut}, flops)
    return site, Region(frozenset(n.name for n in block.members), frozenset({block.path}))


def _stage_sites(root: nn.Module, blocks: dict[str, tuple[Site, Region]]
                 ) -> list[tuple[Site, Region]]:
    stages = []
    for path, m in root.named_modules():
        if not path or not isinstance(m, nn.Sequential) or len(m) == 0:
            continue
        names = [f"{path}.{child}" for child, _ in m.named_children()]
        if not all(n in blocks for n in names):
            continue
        first, last = blocks[names[0]][0], blocks[names[-1]][0]
        region = Region(frozenset().union(*(blocks[n][1].nodes for n in names)),
                        frozenset({path}))
        site = Site(path, "stage", path, type(m).__name__, first.in_channels, last.out_channels,
                    (), first.stride, 1, first.input_shape, last.output_shape, param_count(m),
                    sum(blocks[n][0].macs for n in names), -1, {"blocks": len(names)},
                    sum(blocks[n][0].flops for n in names))
        stages.append((site, region))
    return stages


def _is_attention_core(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ATTENTION_FUNCTIONS
    return node.op == "call_method" and node.target in _ATTENTION_METHODS


def _boundary(members: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """The tensors outside ``members`` that members read (parameters and non-tensor values
    such as an ``attn_mask=None`` argument aside), and the members that nodes outside read."""
    inputs = {a for n in members for a in n.all_input_nodes
              if a not in members and a.op != "get_attr" and "tensor_meta" in a.meta}
    outputs = {n for n in members if any(u not in members for u in n.users)}
    return inputs, outputs


def _attention_sites(gm: fx.GraphModule, root: nn.Module, costs: NodeCosts
                     ) -> list[tuple[Site, Region]]:
    members = module_members(gm)
    found: dict[str, set[fx.Node]] = {}
    cores = [n for n in gm.graph.nodes if _is_attention_core(n)]
    for core in cores:
        # The innermost module around the core with one input and one output that also
        # computes the projections (a Linear/Conv call) the scores come from.
        paths = [p for p, _ in reversed(list(core.meta.get("nn_module_stack", {}).values()))]
        for path in paths:
            nodes = members.get(path, set())
            inputs, outputs = _boundary(nodes)
            if len(inputs) == 1 and len(outputs) == 1 and any(
                    n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                         (nn.Linear, nn.Conv1d, nn.Conv2d))
                    for n in nodes):
                found.setdefault(path, nodes)
                break
    if _ATTENTION_PREDICATES:
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for node in gm.graph.nodes:
            # A module called twice is one module for two sites: not converted on its own.
            if node.op != "call_module" or node.target in found or calls[node.target] > 1:
                continue
            m = gm.get_submodule(node.target)
            inputs, outputs = _boundary({node})
            if len(inputs) == 1 and len(outputs) == 1 and any(
                    pred(m) for pred in _ATTENTION_PREDICATES):
                found[str(node.target)] = {node}
    out = []
    for path, nodes in found.items():
        (inp,), (outp,) = _boundary(nodes)
        in_shape, out_shape = node_shape(inp), node_shape(outp)
        macs, flops = _sum_costs(nodes, costs)
        module = root.get_submodule(path)
        site = Site(path, "attention", path, type(module).__name__,
                    in_shape[-1] if in_shape else 0, out_shape[-1] if out_shape else 0, (), 1,
                    1, in_shape, out_shape, param_count(module), macs, -1,
                    {"tokens": in_shape[0] if len(in_shape) == 2 else 0}, flops)
        out.append((site, Region(frozenset(n.name for n in nodes), frozenset({path}))))
    return out


def find_sites(gm: fx.GraphModule, root: nn.Module, blocks: Sequence[Block],
               costs: NodeCosts) -> list[tuple[Site, Region]]:
    """Every site of every kind with its region, for a traced, shape-annotated ``gm`` of
    ``root``: the network first, then convs/linears, blocks, stages and attentions in graph
    order.
    Names are local to ``root``."""
    convs = []
    for name, node in call_site_nodes(gm).items():
        if type(gm.get_submodule(node.target)) in (nn.Conv2d, nn.Linear):
            call = int(name.split("#")[1]) if "#" in name else -1
            convs.append(_conv_site(name, node, gm, call, costs))
    by_block = {b.path: _block_site(b, root, costs) for b in blocks}
    stages = _stage_sites(root, by_block)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    in_shape = node_shape(placeholder)
    out_value = output.args[0]
    everything = module_members(gm).get("", set())
    macs, flops = _sum_costs(everything, costs)
    network = Site("network", "network", "", type(root).__name__,
                   in_shape[0] if in_shape else 0,
                   node_shape(out_value)[0] if node_shape(out_value) else 0, (), 1, 1, in_shape,
                   node_shape(out_value), param_count(root), macs, -1, {}, flops)
    return [(network, Region(frozenset(n.name for n in everything), frozenset({""}))),
            *convs, *by_block.values(), *stages, *_attention_sites(gm, root, costs)]


def select_sites(candidates: Sequence[Site], patterns: Iterable[str] | None, *, family: str,
                 model: str) -> list[Site]:
    """Pick the candidates whose names match any glob pattern; every pattern must match."""
    if patterns is None:
        return list(candidates)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InvalidType(f"site patterns must be strings, got {pattern!r}")
        hits = [s for s in candidates if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            names = [s.name for s in candidates]
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40
                                             else "")
            raise InfeasiblePlacement(
                f"site pattern {pattern!r} matches no {family} site of {model}; valid sites: "
                f"{shown or '(none)'} (see `autobuild sites {model} --to {family}`)")
        for s in hits:
            chosen[s.name] = s
    return [s for s in candidates if s.name in chosen]
