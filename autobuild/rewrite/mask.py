"""Switching a converted site's higher-order part off, deterministically and reversibly.

Each family says which of its layers carry the part (``Variant.mask_modules``) and what
switching it off means (``Variant.mask_effect``); the layers honour a plain ``masked``
attribute in ``forward``. Nothing about masking is a parameter or buffer, so it never
reaches a state_dict, and it works in train and eval mode and under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from autobuild.errors import AutobuildError, InvalidType
from autobuild.rewrite.family import get_family
from autobuild.rewrite.record import record_of, unwrap

__all__ = ["mask_targets", "masked"]


def mask_targets(model: Any, site: str) -> list[nn.Module]:
    """The layers whose ``masked`` flag switches ``site``'s higher-order part off."""
    record = record_of(model)
    if record is None:
        raise AutobuildError("this model has no build record: build it with autobuild "
                             "(convert, Analysis.build or load) to mask its sites")
    placement = record.plan.placement
    if not isinstance(site, str) or site not in placement:
        shown = ", ".join(list(placement)[:20]) or "(none)"
        raise AutobuildError(f"site {site} is not converted in this model; converted "
                             f"sites: {shown}")
    choice = placement[site]
    path = record.site_modules.get(site)
    if path is None:
        raise AutobuildError(f"the model does not record where site {site} ended up")
    module = unwrap(model).get_submodule(path) if path else unwrap(model)
    targets = get_family(choice.family).mask_modules(module, choice.opts)
    if not targets:
        raise AutobuildError(f"{choice.family} has nothing to mask at site {site}")
    return targets


@contextlib.contextmanager
def masked(model: Any, sites: Iterable[str] | str) -> Iterator[Any]:
    """Within the block, the given converted sites run without their higher-order part
    (quadratic: the product term; multiplicative: the residual branch; ...); on exit every
    layer is exactly as before."""
    names = [sites] if isinstance(sites, str) else list(sites) \
        if isinstance(sites, Iterable) else None
    if names is None or not all(isinstance(s, str) for s in names):
        raise InvalidType(f"masked() takes a site name or a list of site names, got {sites!r}")
    layers: list[nn.Module] = []
    for name in names:
        layers += mask_targets(model, name)
    previous = [(m, m.masked) for m in layers]
    try:
        for m in layers:
            m.masked = True
        yield model
    finally:
        for m, value in previous:
            m.masked = value
