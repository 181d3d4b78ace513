"""The fx engine: tracing, the analysis of a baseline, sites, placements, plans, the
rewriter and masking. Depends on torch and :mod:`autobuild.errors` only; families and
models register into it (:func:`register_family`, :func:`register_leaf_module`)."""

from autobuild.rewrite.analysis import Analysis, Baseline
from autobuild.rewrite.cost import Counts, count_module, param_count
from autobuild.rewrite.family import (
    Option,
    Variant,
    add_family_loader,
    get_family,
    list_families,
    register_family,
)
from autobuild.rewrite.graph import Block
from autobuild.rewrite.mask import mask_targets, masked
from autobuild.rewrite.placement import KEEP, Choice, Placement
from autobuild.rewrite.plan import INITS, PLAN_VERSION, Conversion, Plan
from autobuild.rewrite.record import (
    BuildRecord,
    Change,
    plan_of,
    record_of,
    root_of,
    set_plan,
    set_record,
    site_modules,
)
from autobuild.rewrite.rewriter import Rewriter
from autobuild.rewrite.sites import SITE_KINDS, Region, Site, register_attention, select_sites
from autobuild.rewrite.trace import register_leaf_module, trace

__all__ = [
    "INITS",
    "KEEP",
    "PLAN_VERSION",
    "SITE_KINDS",
    "Analysis",
    "Baseline",
    "Block",
    "BuildRecord",
    "Change",
    "Choice",
    "Conversion",
    "Counts",
    "Option",
    "Placement",
    "Plan",
    "Region",
    "Rewriter",
    "Site",
    "Variant",
    "add_family_loader",
    "count_module",
    "get_family",
    "list_families",
    "mask_targets",
    "masked",
    "param_count",
    "plan_of",
    "record_of",
    "root_of",
    "register_family",
    "register_leaf_module",
    "register_attention",
    "select_sites",
    "set_plan",
    "set_record",
    "site_modules",
    "trace",
]
