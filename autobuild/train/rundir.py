"""Run directories: what a run records about itself (``train.yaml``, validated by a schema)
and how a directory is made ready for a new run without losing another one.

``train.yaml`` says what the run trained on, with which recipe, and how it stands::

    status: diverged          # running, finished, stopped (early, by a callback), diverged,
    reason: "training diverged: non-finite loss in epoch 3 (step 40); ..."   # failed, interrupted
    epochs_done: 2            # epochs in checkpoint.pt (what --resume continues from)
    data: {spec: imagefolder:/abs/path, ...}
    config: {epochs: 200, lr: 0.1, ...}

A directory holding a run is refused for a new one unless ``--force``; the message says
whether ``--resume`` can continue it (only a run with a checkpoint can be continued).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autobuild.errors import AutobuildError, schema_message
from autobuild.files import (
    OUTPUT_KINDS,
    atomic_copy,
    atomic_write_text,
    ensure_writable_dir,
    staged_directory,
)
from autobuild.rewrite.plan import dump_yaml, load_yaml, yaml_problem

__all__ = ["INIT_WEIGHTS", "RUN_FILE", "RUN_MARKERS", "SAVED_MODEL", "RunRecord",
           "adopted_weights", "check_writable", "default_run_dir", "prepare_run_dir",
           "read_run_record", "resume_history", "write_run_record"]

RUN_FILE = "train.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
#: Files that mark a directory as holding a training run.
RUN_MARKERS = OUTPUT_KINDS["run"][1]
#: A directory `autobuild convert --out` wrote (and ``init.safetensors``, which a saved
#: model trained in place keeps): training it in place keeps its weights.
SAVED_MODEL = OUTPUT_KINDS["model"][1]
INIT_WEIGHTS = "init.safetensors"
STATUSES = ("running", "finished", "stopped", "diverged", "failed", "interrupted")


#: DataRecord keys that runs of earlier versions lack.
_KEYS_ADDED_LATER = ("classes",)


class DataRecord(BaseModel):
    """The data a run trained on (paths absolute: the run is usable from any directory)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    spec: Annotated[str, Field(min_length=1)]
    data_dir: str | None = None
    input_size: Annotated[list[Annotated[int, Field(ge=1)]],
                          Field(min_length=3, max_length=3)] | None = None
    num_classes: Annotated[int, Field(ge=1)] | None = None
    #: The class names in label order (a detector's without the background), checked
    #: against the data of an evaluate, resume or analysis (absent in older runs).
    classes: list[str] | None = None
    train_subset: Annotated[int, Field(ge=1)] | None = None
    augment: str | None = None
    task: Literal["classification", "detection"] | None = None


class ResumeRecord(BaseModel):
    """One ``train --resume``: after which epoch, and the recipe fields it changed (each as
    [before, after]), so that the record keeps every recipe the run trained with."""

    model_config = ConfigDict(extra="forbid", strict=True)
    after_epoch: Annotated[int, Field(ge=0)]
    changed: dict[str, Annotated[list[Any], Field(min_length=2, max_length=2)]]


class RunRecord(BaseModel):
    """The schema of ``train.yaml``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    #: None for the records of older versions, which did not say.
    status: Literal[STATUSES] | None = None  # type: ignore[valid-type]
    reason: str | None = None
    epochs_done: Annotated[int, Field(ge=0)] | None = None
    data: DataRecord
    config: dict[str, Any]
    #: Every resume, oldest first (``config`` is the recipe of the latest).
    resumes: list[ResumeRecord] = []

    @field_validator("config")
    @classmethod
    def _recipe(cls, value: dict[str, Any]) -> dict[str, Any]:
        from autobuild.train.config import TrainConfig

        try:
            return TrainConfig(**value).to_dict()
        except AutobuildError as exc:
            raise ValueError(str(exc)) from None


def read_run_record(run: str) -> dict[str, Any] | None:
    """The validated ``train.yaml`` of a run directory as a dict (None for a directory
    without one, e.g. one `convert --out` wrote). A corrupt record is an error naming the
    offending key, never silently ignored."""
    path = os.path.join(run, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AutobuildError(f"corrupt run record {path!r}: {yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise AutobuildError(f"corrupt run record {path!r}: not a mapping (data, config, ...)")
    try:
        return RunRecord.model_validate(data).model_dump()
    except ValidationError as exc:
        raise AutobuildError(schema_message(exc, f"corrupt run record {path!r}: ")) from None


def write_run_record(run: str, record: dict[str, Any]) -> None:
    """Validate ``record`` and write it as ``train.yaml``, atomically."""
    try:
        clean = RunRecord.model_validate(record).model_dump()
    except ValidationError as exc:  # the code's own record: a bug, named precisely
        raise RuntimeError(schema_message(exc, "run record: ")) from None
    atomic_write_text(os.path.join(run, RUN_FILE), dump_yaml(clean, sort_keys=False))


def resume_history(run: str, config: dict[str, Any], data: dict[str, Any],
                   after_epoch: int) -> list[dict[str, Any]]:
    """The ``resumes`` of ``run``'s record with this resume added: ``config`` (the recipe
    from now on) and ``data`` against the recipe and data the record holds."""
    record = read_run_record(run) or {}
    before = record.get("config") or {}
    changed = {k: [before.get(k), v] for k, v in config.items() if before.get(k) != v}
    now, then = DataRecord(**data).model_dump(), record.get("data")
    # A key older versions did not record (null in their runs) is not a change of data.
    if then is not None and any(then.get(k) != v for k, v in now.items()
                                if not (k in _KEYS_ADDED_LATER and then.get(k) is None)):
        changed["data"] = [then, now]
    return [*record.get("resumes", []), {"after_epoch": after_epoch, "changed": changed}]


def default_run_dir(model: str, family: str | None) -> str:
    """``runs/MODEL-FAMILY``, with characters that are awkward in a directory name (the
    colon of ``timm:resnet18``, a slash) replaced."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{model}-{family or 'baseline'}").strip("._")
    return os.path.join("runs", name or "run")


def _describe(path: str, entries: set[str]) -> str:
    """Why a directory holding a run cannot take a new one, and what the user can do."""
    try:
        record = read_run_record(path) or {}
    except AutobuildError:
        record = {}
    state = record.get("status")
    done = record.get("epochs_done")
    after = f" after {done} epoch{'' if done == 1 else 's'}" if done is not None else ""
    how = f" ({state}{after})" if state else ""
    if CHECKPOINT_FILE in entries:
        return (f"{path!r} holds another run{how}; pass --resume to continue it or --force to "
                "overwrite it (or choose another --out)")
    return (f"{path!r} holds a run that stopped before its first checkpoint{how}: there is "
            "nothing to resume; pass --force to overwrite it (or choose another --out)")


def check_writable(path: str) -> None:
    """Refuse, before any work, a run directory this process cannot write."""
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise AutobuildError(f"cannot write the run directory {path!r}: {probe!r} is not a "
                             "writable directory")


def prepare_run_dir(path: str, *, force: bool = False, adopt: bool = False,
                    dry_run: bool = False, keep: Sequence[str] = ()) -> None:
    """Make ``path`` ready for a new run, never losing another run or a user's weights.

    A directory holding a run (checkpoint, metrics, record) or anything else is refused
    unless ``force``, which replaces it as a whole, in one step (a staged empty directory is
    swapped in: no file of the old run stays beside the new one). With ``adopt`` (training a
    saved model in its own directory), a directory holding just plan + weights is accepted
    and its weights are kept as ``init.safetensors``; once there, they stay the saved
    model's weights (a --force run restarts from them). A ``force`` over a directory that
    is or holds any of ``keep`` (what the run reads), or that holds nothing autobuild
    wrote, is refused. ``dry_run`` only checks.
    """
    if not isinstance(path, str) or not path.strip():
        raise AutobuildError(f"a run directory must be a non-empty path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise AutobuildError(f"{path!r} exists and is not a directory; choose another --out")
    entries = set(os.listdir(path)) if os.path.isdir(path) else set()
    adopting = bool(adopt and entries and entries <= SAVED_MODEL)
    if entries and not force and not adopting:
        if entries & RUN_MARKERS:
            raise AutobuildError(_describe(path, entries))
        raise AutobuildError(f"{path!r} is not empty; choose another --out or pass --force")
    if entries and force:
        # (a saved model trained in its own directory becomes a run: it stays, as init)
        ensure_writable_dir(path, force=True, keep=keep, writes=None if adopt else "run")
    check_writable(path)
    if dry_run:
        return
    weights = os.path.join(path, "weights.safetensors")
    # A run in this directory began from init.safetensors: those are the saved model's own
    # weights (weights.safetensors is then that run's result), and a new run starts again
    # from them.
    init = os.path.join(path, INIT_WEIGHTS)
    original = os.path.join(path, adopted_weights(path))
    if entries and force:
        with staged_directory(path, force=True, writes=None if adopt else "run") as staging:
            if adopt and os.path.exists(original):  # the saved model stays what it was
                plan = os.path.join(path, "plan.yaml")
                if os.path.exists(plan):
                    atomic_copy(plan, os.path.join(staging, "plan.yaml"))
                for name in ("weights.safetensors", INIT_WEIGHTS):
                    atomic_copy(original, os.path.join(staging, name))
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise AutobuildError(f"cannot create {path!r}: {exc.strerror}") from exc
    if adopting and original == weights and os.path.exists(weights):
        # A copy, not a move: other DDP ranks may still be loading these weights.
        atomic_copy(weights, init)


def adopted_weights(path: str) -> str:
    """The file a new run in the saved model directory ``path`` starts from: its
    init.safetensors when a run there began from it, else its weights.safetensors."""
    return INIT_WEIGHTS if os.path.exists(os.path.join(path, INIT_WEIGHTS)) else \
        "weights.safetensors"
