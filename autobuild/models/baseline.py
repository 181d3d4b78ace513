"""A baseline by name (registry) or as a user's module, with what a plan needs to rebuild it."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from autobuild.errors import (
    AutobuildError,
    InvalidType,
    InvalidValue,
    check_input_size,
    check_num_classes,
    schema_error,
)
from autobuild.models.registry import build_model, get_model_entry, load_weights
from autobuild.rewrite import Baseline

__all__ = ["MODEL_ARGS", "ModelArgs", "check_model_args", "resolve_baseline"]

_Rate = Annotated[float, Field(ge=0, lt=1)]


class ModelArgs(BaseModel):
    """The builder arguments a baseline may be given (``--model-arg NAME=VALUE``, the plan's
    ``model_args``), each checked with its bounds before anything is built. A builder that
    does not take one refuses it by name: they are not spread over models that ignore them.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    #: timm: stochastic depth, its rate raised linearly over the blocks (timm's --drop-path).
    drop_path_rate: _Rate | None = None
    #: timm: dropout before the classifier (timm's --drop).
    drop_rate: _Rate | None = None
    #: torchvision: the classifier's dropout (VGG, AlexNet, EfficientNet, MobileNet, ...).
    dropout: _Rate | None = None
    #: torchvision: stochastic depth of EfficientNet and ConvNeXt (Swin's and MaxViT's
    #: builders fix their own).
    stochastic_depth_prob: _Rate | None = None


#: The names ``--model-arg`` takes.
MODEL_ARGS = tuple(ModelArgs.model_fields)


def check_model_args(args: Mapping[str, Any] | None, *, strings: bool = False,
                     source: str = "model argument ") -> dict[str, Any]:
    """``args`` checked against :class:`ModelArgs` (``strings``: values as the command line
    gives them), without the ones left unset."""
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise InvalidType(f"model arguments must be a mapping name -> value, got "
                          f"{type(args).__name__}")
    unknown = sorted(set(args) - set(MODEL_ARGS), key=str)
    if unknown:
        raise InvalidValue(f"{source}{unknown[0]!r}: unknown; valid: {', '.join(MODEL_ARGS)}")
    try:
        checked = (ModelArgs.model_validate_strings(dict(args)) if strings
                   else ModelArgs.model_validate(dict(args)))
    except ValidationError as exc:
        raise schema_error(exc, source) from None
    return checked.model_dump(exclude_none=True)


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


def _unexpected_argument(exc: TypeError, names: Iterable[str]) -> str | None:
    """The argument a builder's TypeError says it does not take (None for another error)."""
    found = re.search(r"(?:unexpected|multiple values for) keyword argument '(\w+)'", str(exc))
    return found.group(1) if found and found.group(1) in names else None


def resolve_baseline(model_or_name: nn.Module | str, *, num_classes: int | None = None,
                     input_size: Sequence[int] | None = None, weights: str | None = None,
                     leaf_modules: Iterable[Any] = (), device: str | None = None,
                     model_args: Mapping[str, Any] | None = None) -> Baseline:
    """Build a named baseline, or wrap a user's module. ``device="meta"`` builds the
    structure only (no weights allocated or initialised), for loading saved weights.
    ``model_args`` (:class:`ModelArgs`) go to the named baseline's builder."""
    leaves = tuple(leaf_modules)
    args = check_model_args(model_args)
    if num_classes is not None:
        check_num_classes(num_classes)
    weights = _weights(weights)
    if isinstance(model_or_name, nn.Module):
        if args:
            raise AutobuildError(f"model arguments ({', '.join(args)}) are for a named "
                                 "baseline's builder; build your module with them instead")
        if weights:
            load_weights(model_or_name, weights)
        size = check_input_size(input_size or (3, 224, 224))
        return Baseline(model_or_name, f"custom:{type(model_or_name).__name__}", size, "",
                        num_classes, weights, leaves)
    if not isinstance(model_or_name, str):
        raise InvalidType(f"a baseline is a model name or an nn.Module, got "
                             f"{type(model_or_name).__name__}")
    entry = get_model_entry(model_or_name)
    if args and entry.trace_root:  # the detectors' builders take **kwargs and drop them
        raise InvalidValue(f"model arguments ({', '.join(args)}) are for classifiers' "
                           f"builders; {model_or_name}'s would ignore them")
    size = check_input_size(input_size or entry.input_size)
    # A dataset with other channels (e.g. grayscale) needs a stem built for them.
    extra = {"in_chans": size[0]} if size[0] != entry.input_size[0] else {}
    where = torch.device(device) if device else contextlib.nullcontext()
    try:
        with where:
            module = build_model(model_or_name, num_classes=num_classes,
                                 weights=None if device == "meta" else weights, **extra, **args)
    except TypeError as exc:
        refused = _unexpected_argument(exc, args)
        if refused:
            raise InvalidValue(f"model argument {refused}: {model_or_name}'s builder does "
                               "not take it (timm models take drop_path_rate and drop_rate, "
                               "torchvision models dropout and stochastic_depth_prob, each "
                               "where its builder has them)") from exc
        if not extra:
            raise
        raise AutobuildError(f"{model_or_name} is built for {entry.input_size[0]}-channel input "
                             f"and cannot take {size[0]} channels") from exc
    except (MemoryError, RuntimeError) as exc:  # e.g. a classifier for 10^9 classes
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and "allocate" not in text and "out of memory" not in text:
            raise
        classes = f" with {num_classes} classes" if num_classes else ""
        raise AutobuildError(f"cannot build {model_or_name}{classes}: not enough memory for its "
                             "weights") from exc
    return Baseline(module, model_or_name, size, entry.trace_root, num_classes, weights, leaves,
                    args)
