"""The families: one module per family, each registering a :class:`Variant` on import."""

from __future__ import annotations

import importlib

from autobuild.errors import unknown_name
from autobuild.variants.base import Option, Variant

__all__ = ["Option", "Variant", "get_variant", "list_variants", "register_variant"]

# Families shipped with autobuild, imported on first use so `import autobuild` stays light.
BUILTIN_FAMILIES = ("quadratic", "multiplicative", "parameter_free", "pde_global", "dirac")

_REGISTRY: dict[str, Variant] = {}
_loaded = False


def register_variant(variant: Variant | type[Variant]) -> Variant:
    """Register a family (an instance or a class); returns the instance."""
    instance = variant() if isinstance(variant, type) else variant
    _REGISTRY[instance.name] = instance
    return instance


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_FAMILIES:
        importlib.import_module(f"autobuild.variants.{module}")


def list_variants() -> list[Variant]:
    _load_builtins()
    return list(_REGISTRY.values())


def get_variant(name: str) -> Variant:
    _load_builtins()
    key = name.replace("_", "-")
    if key in _REGISTRY:
        return _REGISTRY[key]
    raise unknown_name("family", name, _REGISTRY, "`autobuild variants` describes them")
