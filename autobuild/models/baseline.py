"""A baseline by name (registry) or as a user's module, with what a plan needs to rebuild it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autobuild.errors import AutobuildError, InvalidType, InvalidValue
from autobuild.models.registry import build_model, get_model_entry, load_weights
from autobuild.rewrite import Baseline

__all__ = ["resolve_baseline"]


def _size(size: Any) -> tuple[int, int, int]:
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence):
        raise InvalidType(f"input size must be (C, H, W) integers, got {size!r}")
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise InvalidType(f"input size must be (C, H, W) integers, got {tuple(size)!r}")
    if min(size) <= 0:
        raise InvalidValue(f"input size must be C,H,W with positive values, got {tuple(size)}")
    return tuple(size)  # type: ignore[return-value]


def _weights(weights: Any) -> str | None:
    """A weights name as given, or a weights file as an absolute path (the plan records it,
    and a plan must rebuild the same model from any directory)."""
    if weights is None:
        return None
    if not isinstance(weights, str) or not weights.strip():
        raise InvalidType(f"weights must be a file path or a torchvision weights name, got "
                          f"{weights!r}")
    path = os.path.expanduser(weights)
    return os.path.abspath(path) if os.path.exists(path) else weights


def resolve_baseline(model_or_name: nn.Module | str, *, num_classes: int | None = None,
                     input_size: Sequence[int] | None = None, weights: str | None = None,
                     leaf_modules: Iterable[Any] = (), device: str | None = None) -> Baseline:
    """Build a named baseline, or wrap a user's module. ``device="meta"`` builds the
    structure only (no weights allocated or initialised), for loading saved weights."""
    leaves = tuple(leaf_modules)
    if num_classes is not None and (not isinstance(num_classes, int)
                                    or isinstance(num_classes, bool)):
        raise InvalidType(f"num_classes must be a positive integer, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise InvalidValue(f"num_classes must be a positive integer, got {num_classes!r}")
    weights = _weights(weights)
    if isinstance(model_or_name, nn.Module):
        if weights:
            load_weights(model_or_name, weights)
        return Baseline(model_or_name, f"custom:{type(model_or_name).__name__}",
                        _size(input_size or (3, 224, 224)), "", num_classes, weights, leaves)
    if not isinstance(model_or_name, str):
        raise InvalidType(f"a baseline is a model name or an nn.Module, got "
                             f"{type(model_or_name).__name__}")
    entry = get_model_entry(model_or_name)
    size = _size(input_size or entry.input_size)
    # A dataset with other channels (e.g. grayscale) needs a stem built for them.
    extra = {"in_chans": size[0]} if size[0] != entry.input_size[0] else {}
    where = torch.device(device) if device else contextlib.nullcontext()
    try:
        with where:
            module = build_model(model_or_name, num_classes=num_classes,
                                 weights=None if device == "meta" else weights, **extra)
    except TypeError as exc:
        if not extra:
            raise
        raise AutobuildError(f"{model_or_name} is built for {entry.input_size[0]}-channel input "
                             f"and cannot take {size[0]} channels") from exc
    return Baseline(module, model_or_name, size, entry.trace_root, num_classes, weights, leaves)
