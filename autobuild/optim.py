"""Optimizer parameter groups for any (converted) model."""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from autobuild.errors import InvalidValue

__all__ = ["NO_WEIGHT_DECAY_ATTR", "param_groups"]

#: A module lists the names of its own parameters that must not be decayed (Dirac alpha
#: and beta, for instance) in this attribute.
NO_WEIGHT_DECAY_ATTR = "no_weight_decay_params"

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any
                 ) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and the rest (norm parameters, biases, 1-d parameters
    and whatever a module declares in ``no_weight_decay_params``) with weight decay 0."""
    # numbers.Real takes numpy scalars (a sweep's np.float64) as well as int and float.
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or \
            not 0 <= weight_decay < float("inf"):
        raise InvalidValue(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    weight_decay = float(weight_decay)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        exempt = set(getattr(module, NO_WEIGHT_DECAY_ATTR, ()))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORMS) or name in exempt or name == "bias" or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **group_options},
              {"params": no_decay, "weight_decay": 0.0, **group_options}]
    return [g for g in groups if g["params"]]
