"""What a family is (re-exported from the engine, where the contract lives): see
:class:`autobuild.rewrite.family.Variant`."""

from autobuild.rewrite.family import Option, Variant, count_replacement

__all__ = ["Option", "Variant", "count_replacement"]
