"""Saved models: a directory with ``plan.yaml`` and ``weights.safetensors``, never a pickle."""

from __future__ import annotations

import os

from torch import nn

from autobuild.errors import AutobuildError
from autobuild.rewrite.apply import apply_plan, plan_of
from autobuild.rewrite.plan import Plan

__all__ = ["PLAN_FILE", "WEIGHTS_FILE", "ensure_writable_dir", "load", "save"]

PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.safetensors"


def ensure_writable_dir(path: str, *, force: bool = False) -> None:
    """Create ``path``; refuse a non-empty one unless ``force`` (nothing is lost silently)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise AutobuildError(f"{path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise AutobuildError(f"{path!r} is not empty; choose another --out or pass --force to "
                             "overwrite it")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise AutobuildError(f"cannot create {path!r}: {exc.strerror}") from exc


def save(model: nn.Module, directory: str, *, force: bool = False,
         weights_name: str = WEIGHTS_FILE) -> str:
    """Write ``plan.yaml`` + weights into ``directory``; returns the directory."""
    from safetensors.torch import save_model

    plan = plan_of(model)
    if plan is None:
        raise AutobuildError("this model has no plan: build it with autobuild.convert() or "
                             "autobuild.load() so it can be saved as plan + weights")
    ensure_writable_dir(directory, force=force)
    weights = os.path.join(directory, weights_name)
    tmp = weights + ".tmp"
    # save_model handles shared tensors; force_contiguous takes channels_last weights as
    # they are. Written to a temporary name, then renamed: never half-written.
    save_model(model, tmp, force_contiguous=True)
    os.replace(tmp, weights)
    plan.save(os.path.join(directory, PLAN_FILE))
    return directory


def load(directory: str, *, baseline: nn.Module | None = None,
         weights_name: str = WEIGHTS_FILE) -> nn.Module:
    """Rebuild a saved model: apply its plan, then load its weights (strictly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not os.path.isdir(directory):
        raise AutobuildError(f"{directory!r} is not a saved model directory")
    plan = Plan.load(directory)
    model = apply_plan(plan, baseline, load_baseline_weights=False).model
    weights = os.path.join(directory, weights_name)
    if not os.path.exists(weights):
        raise AutobuildError(f"{directory!r} has a plan but no {weights_name}")
    try:
        missing, unexpected = load_model(model, weights, strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "size mismatch" in first or "Error(s) in loading" in first:
            raise AutobuildError(f"weights {weights!r} do not match the plan: {first}") from exc
        raise AutobuildError(f"corrupt weights {weights!r}: {first}") from exc
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise AutobuildError(f"weights {weights!r} do not match the plan: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    model._autobuild_plan = plan
    return model
