"""autobuild: turn vision networks into quadratic, multiplicative, parameter-free,
PDE-Global or Dirac variants, count them, train them and search where the blocks go.

    >>> import autobuild
    >>> model = autobuild.convert("resnet50", to="quadratic", init="preserve")
    >>> autobuild.count(model).macs
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from autobuild.counting import Counts, count
from autobuild.errors import AutobuildError
from autobuild.io import load, save
from autobuild.models import register_model
from autobuild.optim import param_groups
from autobuild.rewrite import Plan, Site, apply_plan, plan_of
from autobuild.variants import Variant, register_variant

__all__ = [
    "AutobuildError",
    "Counts",
    "Plan",
    "Site",
    "Variant",
    "apply_plan",
    "convert",
    "count",
    "fold",
    "load",
    "param_groups",
    "plan_of",
    "register_model",
    "register_variant",
    "save",
    "sites",
]

__version__ = "0.1.0"


def convert(model_or_name: nn.Module | str, to: str, *, sites: Iterable[str] | None = None,
            options: dict[str, Any] | None = None, init: str = "scratch",
            num_classes: int | None = None, input_size: Sequence[int] | None = None,
            weights: str | None = None, leaf_modules: Iterable[Any] = ()) -> nn.Module:
    """Convert a baseline (a registered name or any traceable nn.Module) with family ``to``.

    ``sites`` are glob patterns over site names (default: the family's default sites);
    ``options`` the family's options; ``init`` is "scratch" or "preserve" (the converted
    model computes the baseline's function). ``leaf_modules`` (classes, class names or
    qualified names) are kept opaque by torch.fx, for code it cannot trace. The result
    carries its plan (:func:`plan_of`).
    """
    from autobuild.rewrite import convert_model, resolve_baseline

    base = resolve_baseline(model_or_name, num_classes=num_classes, input_size=input_size,
                            weights=weights, leaf_modules=leaf_modules)
    return convert_model(base, to, sites=sites, options=options, init=init).model


def sites(model_or_name: nn.Module | str, to: str, *, options: dict[str, Any] | None = None,
          num_classes: int | None = None, input_size: Sequence[int] | None = None,
          leaf_modules: Iterable[Any] = ()) -> list[Site]:
    """The sites of a baseline that family ``to`` can convert, with shapes and costs."""
    from autobuild.rewrite import candidate_sites, resolve_baseline

    base = resolve_baseline(model_or_name, num_classes=num_classes, input_size=input_size,
                            leaf_modules=leaf_modules)
    return candidate_sites(base, to, options)


def fold(model: nn.Module) -> nn.Module:
    """Fold every Dirac conv and its batch norm into one plain conv (see
    :func:`autobuild.variants.dirac.fold`); the result is saveable as plan + weights."""
    from autobuild.variants.dirac import fold as _fold

    return _fold(model)
