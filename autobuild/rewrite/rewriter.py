"""The object a family's pass edits, and the only way families change a model.

A site whose module is called once is converted by swapping the module
(``set_submodule``): the model keeps its class and its state_dict keys. A site that is one
of several calls of a shared module (torchvision's single ReLU, say) gets its own new module
``<target>_<k>``, which needs the graph; so does any pass that changes code. The graph is
the analysis' traced graph, copied, never traced again. The rewriter records every change
and where each site ended up (:attr:`site_modules`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from torch import fx, nn

from autobuild.errors import AutobuildError
from autobuild.rewrite.cost import param_count
from autobuild.rewrite.family import check_replacement, is_builtin, own_errors
from autobuild.rewrite.graph_copies import keep_identity
from autobuild.rewrite.record import DROPPED, Change
from autobuild.rewrite.sites import Site
from autobuild.rewrite.trace import trace

__all__ = ["Rewriter"]


def _keep_containers(gm: fx.GraphModule, root: nn.Module) -> None:
    """Put ``root``'s containers back into ``gm``: torch.fx copies the modules the graph
    uses and installs a plain ``Module`` for each container on their paths, so a stage was
    no longer a ``Sequential`` (``model.layer4[-1]``, the hook point of Grad-CAM, failed). A
    container is given back where the copy holds all of it (the same names, the same
    objects: fx copies references), and a Sequential, ModuleList or ModuleDict is rebuilt
    where the copy has all its children: the state_dict stays the same."""
    for name, original in root.named_modules():
        if not name:
            continue
        try:
            copied = gm.get_submodule(name)
        except AttributeError:
            continue
        if type(copied) is not nn.Module or type(original) is nn.Module:
            continue
        if _same_tree(copied, original):
            gm.set_submodule(name, original)
        elif type(original) in (nn.Sequential, nn.ModuleList, nn.ModuleDict) and \
                list(copied._modules) == list(original._modules):
            # (a child holds something the graph does not use, an empty shortcut say: the
            # container is rebuilt around the copied children)
            children = OrderedDict(copied._modules)
            gm.set_submodule(name, nn.ModuleList(children.values())
                             if type(original) is nn.ModuleList else type(original)(children))


def _same_tree(a: nn.Module, b: nn.Module) -> bool:
    """The same submodule names, and the same leaf modules, parameters and buffers."""
    def tree(m: nn.Module) -> set[tuple[str, int]]:
        return {(n, id(x)) for n, x in m.named_modules(remove_duplicate=False)
                if not x._modules} | {(n, 0) for n, _ in m.named_modules(
                    remove_duplicate=False)} | {
            (n, id(t)) for n, t in m.named_parameters(remove_duplicate=False)} | {
            (n, id(t)) for n, t in m.named_buffers(remove_duplicate=False)}

    return tree(a) == tree(b)


class Rewriter:
    """Holds the model being built. ``root`` is the traced submodule ("" = the model);
    ``graph_source`` the analysis graph the rewriter copies when code must change."""

    def __init__(self, model: nn.Module, root: str = "", *,
                 graph_source: fx.Graph | None = None, family: str = "",
                 leaf_modules: tuple[Any, ...] = (), analysis: Any = None) -> None:
        self.model = model
        #: The :class:`~autobuild.rewrite.Analysis` of the baseline (its sites and blocks).
        self.analysis = analysis
        self.root = root
        self.family = family
        self.leaf_modules = leaf_modules
        #: Whether modules were swapped: the analysis graph no longer describes the model.
        self._swapped = False
        self.changes: list[Change] = []
        self.site_modules: dict[str, str] = {}
        self._graph_source = graph_source
        self._gm: fx.GraphModule | None = None
        #: The call nodes of each shared module, in call order, as first found: a converted
        #: call is retargeted to its own module, and must not shift the later calls' index.
        self._calls: dict[str, list[fx.Node]] = {}

    # ---- where things are -----------------------------------------------------------
    @property
    def root_module(self) -> nn.Module:
        return self.model.get_submodule(self.root) if self.root else self.model

    def module(self, site: Site) -> nn.Module:
        """The module now at ``site`` (the root for a network site)."""
        return self.model.get_submodule(site.target) if site.target else self.root_module

    def local(self, path: str) -> str:
        """``path`` relative to the root."""
        return path[len(self.root) + 1:] if self.root and path.startswith(self.root + ".") \
            else path

    def full(self, local: str) -> str:
        return f"{self.root}.{local}" if self.root and local else (local or self.root)

    # ---- the graph, for passes that change code --------------------------------------
    def graph(self) -> fx.GraphModule:
        """The root as a GraphModule installed in the model (created on first use from the
        analysis graph). Edit ``graph().graph``; the rewriter recompiles at the end."""
        if self._gm is None:
            if self._graph_source is not None and not self._swapped:
                graph = copy.deepcopy(self._graph_source)
            else:  # modules were swapped since the analysis: trace what is there now
                graph = trace(self.root_module, leaf_modules=self.leaf_modules).graph
            gm = fx.GraphModule(self.root_module, graph, type(self.root_module).__name__)
            _keep_containers(gm, self.root_module)
            keep_identity(gm)
            self._install_root(gm)
            self._gm = gm
        return self._gm

    def node(self, name: str) -> fx.Node:
        """The graph node called ``name`` in the analysis graph."""
        gm = self.graph()
        for node in gm.graph.nodes:
            if node.name == name:
                return node
        raise AutobuildError(f"node {name!r} is not in the graph of this model")

    def _install_root(self, new_root: nn.Module) -> None:
        if self.root:
            self.model.set_submodule(self.root, new_root)
        else:
            self.model = new_root

    # ---- a family's pass ------------------------------------------------------------
    def apply(self, variant: Any, site: Site, options: dict[str, Any], init: str) -> None:
        """``variant.apply`` on ``site``. A family registered from outside autobuild is
        checked as its author would want (:func:`~autobuild.rewrite.family.own_errors`): an
        exception of its own, or a module whose output does not have the site's shape
        (found later as a torch error deep in the network), names the family and the site."""
        self.family = variant.name
        with own_errors(variant, site) as where:
            variant.apply(self, site, options, init)
        path = self.site_modules.get(site.name)
        if is_builtin(variant) or site.call >= 0 or not path or path == self.root \
                or not site.input_shape or site.kind == "network":
            return  # (ours are tested; a graph edit or a whole network: its forward tells)
        try:
            new = self.model.get_submodule(path)
        except AttributeError:
            raise AutobuildError(f"{where}: it recorded the site at {path!r}, which is not a "
                                 "module of the model (record_site takes the module's full "
                                 "name in the model)") from None
        check_replacement(where, new, site)

    # ---- edits ----------------------------------------------------------------------
    def replace(self, site: Site, new: nn.Module, *, note: str = "") -> None:
        """Put ``new`` at ``site`` (a module call site, or the root for a network site)."""
        if not site.target:
            self.set_root(site, new, note=note)
            return
        old = self.module(site)
        if site.call < 0:
            self.model.set_submodule(site.target, new)
            self._swapped = True
            path = site.target
        else:
            gm = self.graph()
            node = self.node_of_call(site)
            local = f"{self.local(site.target)}_{site.call}"
            gm.add_submodule(local, new)
            node.target = local
            path = self.full(local)
            self._drop_if_unused(self.local(site.target))
        self.site_modules[site.name] = path
        self.changes.append(Change(site.name, self.family, type(old).__name__,
                                   type(new).__name__, param_count(old), param_count(new), note))

    def _drop_if_unused(self, target: str) -> None:
        """Delete a shared module once none of its calls is left (all converted): it would
        stay as dead weight, counted, saved and given to the optimizer."""
        gm = self.graph()
        if not any(n.op in ("call_module", "get_attr") and (
                n.target == target or str(n.target).startswith(target + "."))
                for n in gm.graph.nodes):
            old = gm.get_submodule(target)
            gm.delete_submodule(target)
            self.changes.append(Change(self.full(target), self.family, type(old).__name__,
                                       DROPPED, param_count(old), 0,
                                       "every call of it converted"))

    def node_of_call(self, site: Site) -> fx.Node:
        """The call_module node of a (possibly shared) call site."""
        gm = self.graph()
        target = self.local(site.target)
        if target not in self._calls:
            self._calls[target] = [n for n in gm.graph.nodes
                                   if n.op == "call_module" and n.target == target]
        calls = self._calls[target]
        index = max(site.call, 0)
        if index >= len(calls):
            raise AutobuildError(f"site {site.name!r} is not a call site of this model")
        return calls[index]

    def replace_module(self, path: str, new: nn.Module, *, site: str = "",
                       note: str = "") -> None:
        """Swap the module at ``path`` (inside a site's region, e.g. the BN after a conv)."""
        old = self.model.get_submodule(path)
        self.model.set_submodule(path, new)
        self._swapped = True
        self.changes.append(Change(path, self.family, type(old).__name__, type(new).__name__,
                                   param_count(old), param_count(new),
                                   note or (f"part of site {site}" if site else "")))

    def remove_residual(self, add: str, branch: str) -> None:
        """Replace the residual addition node ``add`` by its ``branch`` operand (node names
        of the analysis graph); :meth:`prune` then drops the shortcut."""
        add_node, branch_node = self.node(add), self.node(branch)
        add_node.replace_all_uses_with(branch_node)
        self.graph().graph.erase_node(add_node)

    def insert_before(self, node: fx.Node, local_name: str, module: nn.Module) -> fx.Node:
        """Call ``module`` (added as ``local_name`` under the root) on ``node``'s first input,
        and feed its output to ``node`` instead."""
        gm = self.graph()
        gm.add_submodule(local_name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(local_name, (node.args[0],))
        node.args = (new, *node.args[1:])
        return new

    def set_root(self, site: Site, new_root: nn.Module, *, note: str = "") -> None:
        """Replace the whole traced root (families that rebuild the network)."""
        before = self.root_module
        self._install_root(new_root)
        self._gm, self._calls = None, {}
        self._swapped = True
        self.site_modules[site.name] = self.root
        self.changes.append(Change(site.name, self.family, type(before).__name__,
                                   type(new_root).__name__, param_count(before),
                                   param_count(new_root), note))

    def record_site(self, site: Site, path: str | None = None) -> None:
        """Note where ``site`` ended up (passes that edit the graph directly)."""
        self.site_modules[site.name] = self.root if path is None else path

    def record(self, site: str, before: str, after: str, params_before: int,
               params_after: int, note: str = "") -> None:
        self.changes.append(Change(site, self.family, before, after, params_before,
                                   params_after, note))

    def prune(self) -> None:
        """Drop the graph's dead code and the submodules it no longer calls (after a pass
        rewired the graph, e.g. removed skip connections)."""
        gm = self.graph()
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()

    def finish(self) -> nn.Module:
        """Recompile the edited graph (if any) and return the model."""
        if self._gm is not None:
            self._gm.graph.lint()
            self._gm.recompile()
        return self.model

    def __repr__(self) -> str:
        return f"Rewriter(root={self.root!r}, changes={len(self.changes)})"
