"""Plan files and saved models: a directory with ``plan.yaml`` and ``weights.safetensors``,
never a pickle, written atomically (:mod:`autobuild.files`)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from autobuild.errors import AutobuildError, in_context
from autobuild.files import _atomic_by_name, _step, atomic_write_text, staged_directory
from autobuild.rewrite import Placement, Plan, get_family, plan_of, record_of, set_record
from autobuild.rewrite.plan import load_yaml, yaml_problem
from autobuild.rewrite.record import unwrap, without_dropped

__all__ = ["PLAN_FILE", "WEIGHTS_FILE", "load", "load_placement", "load_plan", "plan_in",
           "read_weights",
           "save", "save_plan", "save_weights"]

PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.safetensors"


def as_path(value: Any) -> Any:
    """``str(value)`` for a ``pathlib.Path`` (any ``os.PathLike`` of str); anything else is
    returned as it is, for the caller's own check to name it."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value


# ---- plans -----------------------------------------------------------------------------
def save_plan(plan: Plan, path: str) -> None:
    path = as_path(path)
    atomic_write_text(path, plan.dumps("json" if path.endswith(".json") else "yaml"))


def load_plan(path: str) -> Plan:
    """A plan from a file, or from a directory holding plan.yaml/plan.json."""
    path = as_path(path)
    if not isinstance(path, str) or not path:
        raise AutobuildError(f"a plan is a file or directory path, got {path!r}")
    if os.path.isdir(path):
        for name in ("plan.yaml", "plan.yml", "plan.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise AutobuildError(f"{path!r} holds no plan.yaml or plan.json")
    if not os.path.exists(path):
        raise AutobuildError(f"plan file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AutobuildError(f"corrupt plan {path!r}: {exc}") from exc
    return Plan.loads(text, fmt="json" if path.endswith(".json") else "yaml", source=repr(path))


def load_placement(path: str) -> Placement:
    """A placement file: YAML/JSON mapping site -> choice (optionally under a top-level
    ``placement:`` key), or a plan file (its placement; :func:`plan_in` tells which)."""
    import yaml

    path = as_path(path)
    if isinstance(path, str) and os.path.isdir(path):
        raise AutobuildError(f"placement file {path!r} is a directory; give a YAML/JSON file "
                             "(or a plan.yaml)")
    if not isinstance(path, str) or not os.path.isfile(path):
        raise AutobuildError(f"placement file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AutobuildError(f"corrupt placement file {path!r}: {yaml_problem(exc)}") from exc
    if isinstance(data, dict) and "autobuild_plan" in data:
        return Plan.from_dict(data, repr(path)).placement
    if isinstance(data, dict) and set(data) == {"placement"}:
        data = data["placement"]
    if not isinstance(data, dict) or not data:
        raise AutobuildError(f"placement file {path!r} must map site names to choices, e.g. "
                             "'layer1.0.conv1: quadratic:ours'")
    try:
        return Placement(data)
    except AutobuildError as exc:
        raise in_context(exc, f"placement file {path!r}: {exc}") from exc


def plan_in(path: str) -> Plan | None:
    """The plan a placement file is, when it is a plan file (None for a placement file);
    call after :func:`load_placement` has checked the file."""
    with open(as_path(path), encoding="utf-8") as f:
        data = load_yaml(f)
    return Plan.from_dict(data, repr(path)) if isinstance(data, dict) and \
        "autobuild_plan" in data else None


# ---- models ----------------------------------------------------------------------------
def save_weights(model: nn.Module, path: str) -> None:
    """The model's state as safetensors at ``path``, atomically (shared tensors once,
    channels_last weights written contiguously)."""
    from safetensors.torch import save_model

    _atomic_by_name(path, lambda tmp: save_model(model, tmp, force_contiguous=True))


def save(model: nn.Module, directory: str, *, force: bool = False) -> str:
    """Write ``plan.yaml`` + ``weights.safetensors`` as ``directory`` (replacing it
    completely with ``force``); returns the directory. A model under torch.compile or
    DDP/DataParallel is saved as the module it wraps (its keys without ``_orig_mod.`` /
    ``module.``), as :func:`load` reads it back."""
    directory = as_path(directory)
    model = unwrap(model)
    plan = plan_of(model)
    if plan is None:
        raise AutobuildError("this model has no plan: build it with autobuild.convert() or "
                             "autobuild.load() so it can be saved as plan + weights")
    with staged_directory(directory, force=force, writes="model") as staging:
        save_weights(model, os.path.join(staging, WEIGHTS_FILE))
        _step("weights")
        save_plan(plan, os.path.join(staging, PLAN_FILE))
        _step("plan")
    return directory


def read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutobuildError(f"corrupt weights {path!r}: {first}") from exc
    # safetensors 0.8 returns tensors at the file's byte offsets, and MKL's matmul rounds
    # differently at another alignment: a loaded model (its weights are assigned, not
    # copied) would not compute its saved self bit for bit. Fresh storage is 64-byte aligned.
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}


#: (parameter name, value, the layer classes that own it) of a legacy fill.
_Fill = tuple[str, float, tuple[type, ...]]


def _legacy_parameters(plan: Plan) -> list[_Fill]:
    """The parameters weights saved with ``plan`` may lack and the value that reproduces the
    saved function (the families' ``legacy_parameters``), on the families' own layers."""
    fills: list[_Fill] = []
    for conversion in plan.conversions:
        family = get_family(conversion.family)
        for since, values in family.legacy_parameters.items():
            if plan.written_version <= since:
                fills += [(n, v, tuple(family.leaf_modules)) for n, v in values.items()]
    return fills


def _fill_legacy(model: nn.Module, state: dict[str, torch.Tensor],
                 expected: dict[str, torch.Tensor], fills: list[_Fill]) -> dict[str, torch.Tensor]:
    added = {}
    for key in (k for k in expected if k not in state) if fills else ():
        owner, _, name = key.rpartition(".")
        for param, value, layers in fills:
            if name == param and isinstance(model.get_submodule(owner), layers):
                added[key] = torch.full(expected[key].shape, value, dtype=expected[key].dtype)
    return {**state, **added} if added else state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, *,
                assign: bool, fills: list[_Fill] | None = None) -> None:
    expected = model.state_dict(keep_vars=True)
    state = _fill_legacy(model, without_dropped(model, state), expected, fills or [])
    # safetensors stores a tied (shared) tensor once: an alias the file lacks is not missing.
    names_of: dict[int, list[str]] = {}
    for name, t in expected.items():
        names_of.setdefault(id(t), []).append(name)
    missing = sorted(k for k in expected if k not in state
                     and not any(n in state for n in names_of[id(expected[k])]))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(k for k in state if k in expected and
                        tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        raise AutobuildError(f"weights {path!r} do not match the plan: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                             f"{unexpected[:3]}), {len(mismatched)} of another shape (e.g. "
                             f"{mismatched[:3]})")
    model.load_state_dict(state, strict=False, assign=assign)


def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers the file does not hold (``persistent=False``: a function of the shapes, such
    as the Dirac conv's δ) are still on the meta device after the assign: give them memory
    and let their module fill them (timm's ``init_non_persistent_buffers`` convention)."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"]
        if meta and callable(getattr(module, "init_non_persistent_buffers", None)):
            for name in meta:
                setattr(module, name, torch.empty_like(getattr(module, name), device="cpu"))
            module.init_non_persistent_buffers()


def _has_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def load(directory: str, *, baseline: nn.Module | None = None,
         weights_name: str = WEIGHTS_FILE) -> nn.Module:
    """Rebuild a saved model: the structure from its plan (on the meta device: nothing is
    initialised only to be overwritten), then its weights, assigned from the file (in the
    dtype they were saved in). With ``baseline`` (a model of your own that is not
    registered), the model is built on that module and the weights are copied into it: it
    keeps the baseline's dtype and device."""
    from autobuild.api import build_plan

    directory = as_path(directory)

    if not isinstance(directory, str) or not os.path.isdir(directory):
        raise AutobuildError(f"{directory!r} is not a saved model directory")
    plan = load_plan(directory)
    path = os.path.join(directory, weights_name)
    if not os.path.exists(path):
        raise AutobuildError(f"{directory!r} has a plan but no {weights_name}")
    state = read_weights(path)
    fills = _legacy_parameters(plan)
    model = None
    if baseline is None:
        with contextlib.suppress(AutobuildError, RuntimeError, NotImplementedError, TypeError,
                                 ValueError):
            model = build_plan(plan, load_baseline_weights=False, device="meta")
    if model is not None:
        record = record_of(model)
        _load_state(model, state, path, assign=True, fills=fills)
        _init_non_persistent_buffers(model)
        if _has_meta(model):  # a buffer the file does not hold (not persistent): build for real
            model = None
        else:
            set_record(model, record)
    if model is None:
        try:
            model = build_plan(plan, baseline, load_baseline_weights=False)
        except AutobuildError as exc:  # (what the plan says: the file is where to fix it)
            where = os.path.join(directory, PLAN_FILE)
            raise in_context(exc, f"{where}: {exc}") from exc
        _load_state(model, state, path, assign=False, fills=fills)
    return model
