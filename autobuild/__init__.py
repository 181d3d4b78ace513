"""autobuild: turn vision networks into quadratic, multiplicative, parameter-free,
PDE-Global or Dirac variants, count them, train them and search where the blocks go.

    >>> import autobuild
    >>> a = autobuild.analyze("resnet50")
    >>> p = autobuild.Placement({"layer1.0.conv1": "quadratic:ours", "layer3": "pde-global"})
    >>> a.cost(p).macs, autobuild.count(a.build(p)).macs
"""

from __future__ import annotations

from torch import nn

import autobuild.variants  # noqa: F401  (installs the loader of the built-in families)
from autobuild.api import analyze, build_plan, convert, sites
from autobuild.counting import Counts, count
from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.io import load, save
from autobuild.models import register_model
from autobuild.optim import param_groups
from autobuild.rewrite import (
    Analysis,
    Choice,
    Placement,
    Plan,
    Site,
    masked,
    plan_of,
    register_attention,
    register_leaf_module,
    site_modules,
)
from autobuild.variants import Option, Variant, register_variant

__all__ = [
    "Analysis",
    "AutobuildError",
    "Choice",
    "Counts",
    "InfeasiblePlacement",
    "Option",
    "Placement",
    "Plan",
    "Site",
    "Variant",
    "analyze",
    "build_plan",
    "convert",
    "count",
    "fold",
    "importance",
    "leaf_modules",
    "load",
    "masked",
    "param_groups",
    "plan_of",
    "register_attention",
    "register_leaf_module",
    "register_model",
    "register_variant",
    "save",
    "site_modules",
    "sites",
]

__version__ = "0.1.0"


def fold(model: nn.Module) -> nn.Module:
    """Fold every Dirac conv and its batch norm into one plain conv (see
    :func:`autobuild.variants.dirac.fold`); the result is saveable as plan + weights."""
    from autobuild.variants.dirac import fold as _fold

    return _fold(model)


def importance(model: nn.Module, data: object, **kwargs: object) -> object:
    """RI importance of every converted site of a trained model on ``data`` (a data spec or
    an :class:`autobuild.train.Data`), as a pandas DataFrame sorted by RI; see
    :func:`autobuild.search.importance`."""
    from autobuild.search.importance import importance as _importance

    return _importance(model, data, **kwargs)


def leaf_modules() -> list[type[nn.Module]]:
    """The module types autobuild's traces keep whole: every family's layers, the layers
    torch.fx cannot trace through, and what :func:`register_leaf_module` added. Other
    tracers need them to trace a converted model, e.g. torchvision's
    ``create_feature_extractor(m, nodes, tracer_kwargs={"leaf_modules":
    autobuild.leaf_modules()})``."""
    from autobuild.rewrite.trace import leaf_module_types
    from autobuild.variants import list_variants

    list_variants()  # loads every family; their layers register themselves
    return list(leaf_module_types())


def __getattr__(name: str) -> object:
    # ``autobuild.search`` and ``autobuild.train`` without importing Optuna at import time.
    if name in ("search", "train"):
        import importlib

        return importlib.import_module(f"autobuild.{name}")
    raise AttributeError(f"module 'autobuild' has no attribute {name!r}")
