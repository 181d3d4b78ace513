"""The model registry. Builders are looked up by name and called with ``num_classes``."""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autobuild.errors import (
    AutobuildError,
    InvalidType,
    InvalidValue,
    brief,
    check_input_size,
    check_num_classes,
    unknown_name,
)

__all__ = [
    "ModelEntry",
    "build_model",
    "get_model_entry",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]


@dataclass(frozen=True)
class ModelEntry:
    """How to build one baseline.

    ``trace_root`` names the submodule that torch.fx traces and that conversions apply to
    ("" = the whole model; detectors use "backbone" because their heads are not traceable).
    ``input_size`` is the (C, H, W) used for shape propagation and counting.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    source: str
    trace_root: str = ""
    description: str = ""
    #: ``loader(model, weights)`` for ``--weights``, when the plain state-dict / torchvision
    #: weights loading does not fit (detectors also take their backbone's weights).
    weights_loader: Callable[[nn.Module, str], None] | None = None


_REGISTRY: dict[str, ModelEntry] = {}
#: Called once before the first look-up: imports the built-in baselines (set by the
#: package, so that this module does not depend on the modules that register into it).
_builtin_loader: Callable[[], None] | None = None


def set_builtin_loader(loader: Callable[[], None]) -> None:
    global _builtin_loader
    _builtin_loader = loader


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
    source: str = "user",
    trace_root: str = "",
    description: str = "",
    overwrite: bool = False,
    weights_loader: Callable[[nn.Module, str], None] | None = None,
) -> ModelEntry:
    """Register a baseline builder. ``builder(num_classes=...)`` must return an nn.Module."""
    if not isinstance(name, str) or not name.strip() or name.startswith("timm:"):
        raise InvalidValue(f"a model name must be a non-empty string not starting with "
                           f"'timm:', got {name!r}")
    if not callable(builder):
        raise InvalidType(f"builder must be callable (builder(num_classes=...) -> nn.Module), "
                          f"got {type(builder).__name__}")
    input_size = check_input_size(input_size)
    check_num_classes(num_classes)
    if name in _REGISTRY and not overwrite:
        raise AutobuildError(f"model {name!r} is already registered (pass overwrite=True)")
    entry = ModelEntry(name, builder, tuple(input_size), num_classes, source, trace_root,
                       description, weights_loader)
    _REGISTRY[name] = entry
    return entry


def _load_builtins() -> None:
    global _builtin_loader
    loader, _builtin_loader = _builtin_loader, None
    if loader is not None:
        loader()


def list_models(source: str | None = None) -> list[ModelEntry]:
    """All registered baselines (timm models are reachable as ``timm:<name>`` too)."""
    _load_builtins()
    return [e for e in _REGISTRY.values() if source is None or e.source == source]


def get_model_entry(name: str) -> ModelEntry:
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_entry(name[len("timm:"):])
    if os.sep in name or name.startswith("."):  # a path, not a name: `convert runs/typo`
        raise AutobuildError(f"{name!r}: no such saved model directory (and no registered "
                             "model is named so: `autobuild models` lists them)")
    raise unknown_name("model", name, _REGISTRY,
                       "timm models as timm:<name>; `autobuild models` lists them; a model of "
                       "your own is registered first: autobuild.register_model, or --import "
                       "MODULE on the command line")


def build_model(name: str, *, num_classes: int | None = None, weights: str | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a registered baseline, optionally loading ``weights`` (a file or a torchvision
    weights name such as ``IMAGENET1K_V1``)."""
    entry = get_model_entry(name)
    kw = dict(kwargs)
    if num_classes is None and entry.source == "user" and _requires_num_classes(entry.builder):
        # register_model's contract is builder(num_classes=...): one without a default of
        # its own gets the registered count (a builder with one keeps it, as saved plans
        # that recorded no count were built with it)
        num_classes = entry.num_classes
    if num_classes is not None:
        kw["num_classes"] = num_classes
    model = entry.builder(**kw)
    if weights and entry.weights_loader is not None:
        entry.weights_loader(model, weights)
    elif weights:
        load_weights(model, weights, name)
    return model


def read_state_dict(path: str) -> Any:
    """A state dict file (.pth/.pt/.safetensors; a ``{"state_dict": ...}`` wrapper is
    unwrapped). Raises what the readers raise."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _requires_num_classes(builder: Callable[..., nn.Module]) -> bool:
    try:
        parameter = inspect.signature(builder).parameters.get("num_classes")
    except (TypeError, ValueError):  # no signature to read (a C builtin)
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def load_weights(model: nn.Module, weights: str, model_name: str = "") -> None:
    """Load a state dict file (.pth/.pt/.safetensors) or named torchvision weights."""
    if os.path.isdir(weights):
        raise AutobuildError(f"weights {weights!r} is a directory; give the weights file "
                             "(a saved model's is DIR/weights.safetensors)")
    if os.path.exists(weights):
        not_tensors = (f"cannot load weights {weights!r}: not a readable file of tensors (a "
                       "state dict saved by torch.save as .pth/.pt, or .safetensors)")
        try:
            state = read_state_dict(weights)
        except pickle.UnpicklingError as exc:  # (torch's message advises unsafe loading)
            raise AutobuildError(f"{not_tensors}; autobuild never unpickles code") from exc
        except OSError as exc:  # (unreadable: the system's words say why)
            raise AutobuildError(f"cannot read weights {weights!r}: "
                                 f"{exc.strerror or brief(exc)}") from exc
        except Exception as exc:  # (a text file, a truncated one: the readers' words, such
            # as "101" or "pop from empty list", would say nothing more)
            raise AutobuildError(f"{not_tensors}; truncated, or another format") from exc
        if not isinstance(state, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise AutobuildError(f"{not_tensors}: it holds a {type(state).__name__}, not names "
                                 "-> tensors")
        try:
            model.load_state_dict(state)
        except Exception as exc:  # wrong architecture
            raise AutobuildError(f"cannot load weights {weights!r} into {model_name or 'model'}:"
                                 f" {brief(exc)}") from exc
        return
    if os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors")):
        raise AutobuildError(f"weights file {weights!r} does not exist")
    try:
        import torchvision

        enum = torchvision.models.get_model_weights(model_name)
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except Exception as exc:
        raise AutobuildError(f"{model_name!r} has no torchvision weights named {weights!r};"
                             " give a weights file path instead") from exc
    state = fetch_weights(lambda: w.get_state_dict(progress=False), str(w))
    model.load_state_dict(state)


def fetch_weights(fetch: Callable[[], Any], what: str) -> Any:
    """``fetch()`` (a download into the torch hub cache, or a read from it); a failure is
    one line, and leaves no cache directory it created on the way (offline, torch makes
    ``~/.cache/torch/hub/checkpoints`` before it finds there is no network)."""
    import torch.hub

    made, path = [], os.path.join(torch.hub.get_dir(), "checkpoints")
    while not os.path.exists(path) and path != os.path.dirname(path):
        made.append(path)
        path = os.path.dirname(path)
    try:
        return fetch()
    except Exception as exc:
        for directory in made:  # innermost first; only what the download left empty
            try:
                os.rmdir(directory)
            except OSError:
                break
        raise AutobuildError(f"cannot fetch {what} (no network?): put the file in the torch "
                             "hub cache or pass a local weights file") from exc


def _timm_entry(timm_name: str) -> ModelEntry:
    try:
        import timm
    except ImportError as exc:
        raise AutobuildError("timm models need the optional extra: pip install "
                             "'autobuild[timm]'") from exc
    names = timm.list_models()
    if timm_name not in names:  # the closest of all of them, and a few for the flavour
        raise unknown_name("timm model", timm_name, names, "timm.list_models() lists them",
                           shown=10)

    def builder(num_classes: int = 1000, **kw: Any) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kw)

    cfg = timm.get_pretrained_cfg(timm_name)
    size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    return ModelEntry(f"timm:{timm_name}", builder, size, 1000, "timm")
