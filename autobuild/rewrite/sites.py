"""Candidate sites: the places in a traced network where a family can put its blocks.

Kinds:
  ``conv``    one Conv2d *call* (a module called twice is two sites, ``name#0``/``name#1``);
              ``bn``/``act`` name the batch norm and activation that directly follow it.
  ``linear``  one Linear call.
  ``block``   a residual block: a module whose output is ``act?(branch(x) + shortcut(x))``.
  ``stage``   an nn.Sequential whose children are all residual blocks.
  ``network`` the whole traced root (families that rebuild or rewire the network).
"""

from __future__ import annotations

import fnmatch
import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autobuild.errors import AutobuildError
from autobuild.rewrite.trace import shape_propagate, trace

__all__ = ["SITE_KINDS", "Site", "call_site_nodes", "find_sites", "select_sites"]

SITE_KINDS = ("conv", "linear", "block", "stage", "network")
_ADDS = {operator.add, operator.iadd, torch.add}
_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Mish)
_ACT_FNS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
            torch.nn.functional.silu, torch.nn.functional.gelu}


@dataclass(frozen=True)
class Site:
    """One place a family can convert. ``name`` is unique and stable: it is what plans store.

    ``target`` is the module's qualified name in the model ("" for the whole network);
    ``call`` the index of this call among the module's calls (-1 when called once).
    Shapes exclude the batch dimension; ``params`` and ``macs`` are the site's own.
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kernel_size"] = list(self.kernel_size)
        d["input_shape"] = list(self.input_shape)
        d["output_shape"] = list(self.output_shape)
        return d


def _shape(node: Any) -> tuple[int, ...]:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return ()
    return tuple(int(s) for s in meta.shape[1:])


def call_site_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Map each call-site name (``target`` or ``target#k``) to its call_module node."""
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


def _module_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _conv_site(name: str, node: fx.Node, m: nn.Module, call: int, gm: fx.GraphModule) -> Site:
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    # The stem reads the network input; QuadraLib leaves it first-order.
    extra: dict[str, Any] = {"stem": isinstance(node.args[0], fx.Node)
                             and node.args[0].op == "placeholder"}
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if user is not None and user.op == "call_module" and isinstance(
            gm.get_submodule(user.target), nn.modules.batchnorm._BatchNorm):
        extra["bn"] = user.target
        user = next(iter(user.users)) if len(user.users) == 1 else None
    if user is not None and (
            (user.op == "call_module" and isinstance(gm.get_submodule(user.target), _ACTS))
            or (user.op in ("call_function", "call_method") and (
                user.target in _ACT_FNS or user.target in ("relu", "relu_")))):
        extra["act"] = (user.target if user.op == "call_module"
                        else f"fn:{getattr(user.target, '__name__', user.target)}")
    if isinstance(m, nn.Conv2d):
        out_elems = 1
        for s in out_shape[1:]:
            out_elems *= s
        k = tuple(m.kernel_size)
        macs = out_elems * m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
        return Site(name, "conv", node.target, type(m).__name__, m.in_channels, m.out_channels,
                    k, int(m.stride[0]), m.groups, in_shape, out_shape, _module_params(m), macs,
                    call, extra)
    rows = 1
    for s in out_shape[:-1]:
        rows *= s
    return Site(name, "linear", node.target, type(m).__name__, m.in_features, m.out_features,
                (), 1, 1, in_shape, out_shape, _module_params(m), rows * m.in_features *
                m.out_features, call, extra)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
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


def _block_sites(gm: fx.GraphModule, calls: dict[str, fx.Node], model: nn.Module) -> list[Site]:
    """Residual blocks, found by structure rather than by class: a module whose output is
    ``add(a, b)`` (optionally followed by an activation) where both a and b depend on the
    module's single input and neither depends on the other."""
    members: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            members[path].append(node)
    sites: list[Site] = []
    adds: list[fx.Node] = []
    for path, nodes in members.items():
        if not path:
            continue
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
        tensor_inputs = [a for a in inputs if a.op != "get_attr"]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(tensor_inputs) != 1 or len(outputs) != 1:
            continue
        x, out = tensor_inputs[0], outputs[0]
        add = out
        if not _is_add(add) and add.all_input_nodes:
            act_ok = (add.op == "call_module" and isinstance(gm.get_submodule(add.target),
                                                              _ACTS)) or add.target in _ACT_FNS
            add = add.all_input_nodes[0] if act_ok else add
        if not _is_add(add):
            continue
        operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        a, b = operands
        anc_a, anc_b = _ancestors(a, {x}), _ancestors(b, {x})
        if x not in anc_a or x not in anc_b:
            continue
        # Branch and shortcut may share a pre-activation, but not an earlier residual add:
        # that would make this module a stage (several blocks), not one block.
        if any(_is_add(n) for n in (anc_a & anc_b) - {x}):
            continue
        # The shortcut is the operand with the shorter path from the input.
        branch, short = (a, b) if len(anc_a & inside) >= len(anc_b & inside) else (b, a)
        module = model.get_submodule(path)  # the gm's containers are plain Modules
        in_shape, out_shape = _shape(x), _shape(out)
        if not in_shape or not out_shape:
            continue
        # Ceiling division: a stride-2 block maps 7x7 to 4x4.
        stride = max(1, -(-in_shape[-1] // out_shape[-1])) if len(in_shape) == 3 else 1
        macs = sum(s.macs for s in _conv_like(calls, gm) if s.target.startswith(path + "."))
        sites.append(Site(path, "block", path, type(module).__name__, in_shape[0], out_shape[0],
                          (), stride, 1, in_shape, out_shape, _module_params(module), macs, -1,
                          {"shortcut": "identity" if _through_identity(short, gm) is x
                           else "projection"}))
        adds.append(add)
    # A one-block nn.Sequential has the same structure as its block: keep the inner one.
    innermost: dict[fx.Node, Site] = {}
    for site, add in zip(sites, adds, strict=True):
        if add not in innermost or len(site.name) > len(innermost[add].name):
            innermost[add] = site
    keep = {id(s) for s in innermost.values()}
    return [s for s in sites if id(s) in keep]


def _through_identity(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Follow calls of nn.Identity back to their input (CIFAR blocks call one as shortcut)."""
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node


def _conv_like(calls: dict[str, fx.Node], gm: fx.GraphModule) -> list[Site]:
    cache = getattr(gm, "_autobuild_conv_sites", None)
    if cache is not None:
        return cache
    out = []
    for name, node in calls.items():
        m = gm.get_submodule(node.target)
        if type(m) in (nn.Conv2d, nn.Linear):
            call = int(name.split("#")[1]) if "#" in name else -1
            out.append(_conv_site(name, node, m, call, gm))
    gm._autobuild_conv_sites = out
    return out


def _stage_sites(model: nn.Module, blocks: list[Site]) -> list[Site]:
    by_name = {b.name: b for b in blocks}
    stages = []
    for path, m in model.named_modules():
        if not path or not isinstance(m, nn.Sequential) or len(m) == 0:
            continue
        names = [f"{path}.{child}" for child, _ in m.named_children()]
        if not all(n in by_name for n in names):
            continue
        first, last = by_name[names[0]], by_name[names[-1]]
        stages.append(Site(path, "stage", path, type(m).__name__, first.in_channels,
                           last.out_channels, (), first.stride, 1, first.input_shape,
                           last.output_shape, _module_params(m),
                           sum(by_name[n].macs for n in names), -1, {"blocks": len(names)}))
    return stages


def find_sites(model: nn.Module, input_size: Sequence[int], *, root: str = "",
               leaf_modules: Iterable[Any] = ()) -> list[Site]:
    """Every candidate site of every kind, in graph order, with shapes and costs.

    ``root`` restricts tracing to a submodule (site names keep the full path).
    """
    sub = model.get_submodule(root) if root else model
    gm = trace(sub, leaf_modules=leaf_modules)
    shape_propagate(gm, tuple(input_size))
    calls = call_site_nodes(gm)
    convs = _conv_like(calls, gm)
    blocks = _block_sites(gm, calls, sub)
    stages = _stage_sites(sub, blocks)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    network = Site("network", "network", "", type(sub).__name__,
                   _shape(placeholder)[0] if _shape(placeholder) else 0,
                   0, (), 1, 1, _shape(placeholder), _shape(outputs[0].args[0]) if outputs else (),
                   _module_params(sub), sum(s.macs for s in convs), -1, {})
    # Graph order within each kind; kinds in SITE_KINDS order.
    sites = convs + blocks + stages
    if root:
        sites = [_prefixed(s, root) for s in sites]
    return [network] + sites


def _prefixed(site: Site, root: str) -> Site:
    from dataclasses import replace

    extra = dict(site.extra)
    for key in ("bn", "act"):  # module names; functions ("fn:relu") stay as they are
        if extra.get(key) and not extra[key].startswith("fn:"):
            extra[key] = f"{root}.{extra[key]}"
    return replace(site, name=f"{root}.{site.name}", target=f"{root}.{site.target}", extra=extra)


def select_sites(candidates: Sequence[Site], patterns: Iterable[str] | None, *, family: str,
                 model: str) -> list[Site]:
    """Pick the candidates whose names match any glob pattern; every pattern must match."""
    if patterns is None:
        return list(candidates)
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        hits = [s for s in candidates if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            names = [s.name for s in candidates]
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40
                                             else "")
            raise AutobuildError(
                f"site pattern {pattern!r} matches no {family} site of {model}; valid sites: "
                f"{shown or '(none)'} (see `autobuild sites {model} --to {family}`)")
        for s in hits:
            chosen[s.name] = s
    return [s for s in candidates if s.name in chosen]
