"""The object a family's pass edits: swaps modules at call sites, and switches to an fx
graph only when code (not just modules) has to change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from autobuild.errors import AutobuildError
from autobuild.rewrite.sites import Site, call_site_nodes
from autobuild.rewrite.trace import trace

__all__ = ["Change", "Rewriter"]


@dataclass
class Change:
    """One entry of a pass's record: what replaced what, where."""

    site: str
    family: str
    before: str
    after: str
    params_before: int = 0
    params_after: int = 0
    note: str = ""


@dataclass
class Rewriter:
    """Holds the model being converted.

    A site whose module is called once is converted by swapping the module
    (``set_submodule``): the model keeps its class and its state_dict keys. A site that
    is one of several calls of a shared module (torchvision's single ReLU, say) gets its
    own new module ``<target>_<k>``, which needs the traced graph; so does any pass that
    changes code, through :meth:`graph`. ``root`` is the traced submodule ("" = all).
    """

    model: nn.Module
    root: str = ""
    family: str = ""
    changes: list[Change] = field(default_factory=list)
    leaf_modules: tuple[Any, ...] = ()
    _gm: fx.GraphModule | None = None
    _nodes: dict[str, fx.Node] = field(default_factory=dict)

    def module(self, site: Site) -> nn.Module:
        return self.model.get_submodule(site.target) if site.target else self.root_module

    @property
    def root_module(self) -> nn.Module:
        return self.model.get_submodule(self.root) if self.root else self.model

    def graph(self) -> fx.GraphModule:
        """The traced root as a GraphModule installed in the model, created on first use.
        Edit ``graph().graph`` and call ``recompile()`` afterwards."""
        if self._gm is None:
            gm = trace(self.root_module, leaf_modules=self.leaf_modules)
            self._nodes = call_site_nodes(gm)
            self._set_root(gm)
            self._gm = gm
        return self._gm

    def _set_root(self, new_root: nn.Module) -> None:
        plan = getattr(self.model, "_autobuild_plan", None)
        if self.root:
            self.model.set_submodule(self.root, new_root)
        else:
            self.model = new_root
        if plan is not None:
            self.model._autobuild_plan = plan

    def set_root(self, new_root: nn.Module, *, note: str = "") -> None:
        """Replace the whole traced root (families that rebuild the network)."""
        before = self.root_module
        self._set_root(new_root)
        self._gm = None
        self.changes.append(Change(self.root or "network", self.family, type(before).__name__,
                                   type(new_root).__name__, _params(before), _params(new_root),
                                   note))

    def _local(self, target: str) -> str:
        return target[len(self.root) + 1:] if self.root else target

    def replace(self, site: Site, new: nn.Module, *, note: str = "") -> None:
        """Put ``new`` at ``site`` (a module call site)."""
        if not site.target:
            self.set_root(new, note=note)
            return
        old = self.module(site)
        if site.call < 0:
            self.model.set_submodule(site.target, new)
        else:
            gm = self.graph()
            local = self._local(site.name)
            node = self._nodes.get(local)
            if node is None:
                raise AutobuildError(f"site {site.name!r} is not a call site of this model")
            new_name = f"{self._local(site.target)}_{site.call}"
            gm.add_submodule(new_name, new)
            node.target = new_name
            gm.recompile()
        self.changes.append(Change(site.name, self.family, type(old).__name__,
                                   type(new).__name__, _params(old), _params(new), note))

    def recompile(self) -> None:
        if self._gm is not None:
            self._gm.graph.lint()
            self._gm.recompile()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
