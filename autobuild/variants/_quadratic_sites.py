"""Which convs of a network QuadraLib's models leave first-order: the stem and the 1x1
projection shortcuts of residual blocks (see docs/families.md, "quadratic")."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import nn

from autobuild.rewrite.graph import ancestors

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis

__all__ = ["SHORTCUT_CHOICES", "STEM_CHOICES", "projection_shortcuts"]

STEM_CHOICES = ("keep", "convert")
SHORTCUT_CHOICES = ("convert", "linear")

_CACHE: weakref.WeakKeyDictionary[object, frozenset[str]] = weakref.WeakKeyDictionary()


def projection_shortcuts(analysis: Analysis) -> frozenset[str]:
    """Module paths of the convs on the shortcut side of residual blocks (the nodes between
    the block input and the shortcut value that the branch does not use)."""
    cached = _CACHE.get(analysis)
    if cached is not None:
        return cached
    gm = analysis.gm
    found: set[str] = set()
    for block in analysis.blocks.values():
        if block.shortcut != "projection":
            continue
        side = ancestors(block.shortcut_value, {block.input}) & block.members
        side -= ancestors(block.branch, {block.input})
        found |= {str(n.target) for n in side if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), nn.Conv2d)}
    result = frozenset(found)
    _CACHE[analysis] = result
    return result
