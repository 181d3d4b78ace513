"""torch.fx tracing, sites, plans and applying plans."""

from autobuild.rewrite.apply import (
    Baseline,
    Converted,
    apply_plan,
    candidate_sites,
    convert_model,
    plan_of,
    resolve_baseline,
)
from autobuild.rewrite.plan import Conversion, Plan
from autobuild.rewrite.rewriter import Change, Rewriter
from autobuild.rewrite.sites import SITE_KINDS, Site, find_sites, select_sites
from autobuild.rewrite.trace import shape_propagate, trace

__all__ = [
    "SITE_KINDS",
    "Baseline",
    "Change",
    "Conversion",
    "Converted",
    "Plan",
    "Rewriter",
    "Site",
    "apply_plan",
    "candidate_sites",
    "convert_model",
    "find_sites",
    "plan_of",
    "resolve_baseline",
    "select_sites",
    "shape_propagate",
    "trace",
]
