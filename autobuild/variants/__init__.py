"""The families: one module per family, each registering a :class:`Variant` on import.

Built-in families load on first use, so ``import autobuild`` stays light; families of other
packages register through the ``autobuild.families`` entry-point group (an entry point names
a module that registers on import, or a Variant subclass), or by
:func:`register_variant` from user code.
"""

from __future__ import annotations

import importlib

from autobuild.errors import AutobuildError
from autobuild.rewrite.family import (
    Option,
    Variant,
    add_family_loader,
    get_family,
    list_families,
    register_family,
)

__all__ = ["BUILTIN_FAMILIES", "ENTRY_POINT_GROUP", "Option", "Variant", "get_variant",
           "list_variants", "register_variant"]

BUILTIN_FAMILIES = ("quadratic", "multiplicative", "parameter_free", "pde_global", "dirac")
ENTRY_POINT_GROUP = "autobuild.families"


def register_variant(variant: Variant | type[Variant], *, replace: bool = False) -> Variant:
    """Register a family (an instance or a class); a second family with a taken name is
    refused unless ``replace``. Returns the instance."""
    return register_family(variant, replace=replace)


def get_variant(name: str) -> Variant:
    return get_family(name)


def list_variants() -> list[Variant]:
    return list_families()


def _load_families() -> None:
    for module in BUILTIN_FAMILIES:
        importlib.import_module(f"autobuild.variants.{module}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break autobuild
            raise AutobuildError(f"cannot load family plugin {ep.name!r} ({ep.value}): "
                                 f"{exc}") from exc
        if isinstance(obj, type) and issubclass(obj, Variant) or isinstance(obj, Variant):
            register_family(obj)


add_family_loader(_load_families)
