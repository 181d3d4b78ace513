"""The training recipe: one declarative schema, every field a CLI flag of ``autobuild train``.

Each field states its type and bounds once, here; the CLI flags (``autobuild train --lr``),
the API (``TrainConfig(lr=...)``), a search space's ``budget`` and a run's ``train.yaml`` are
all validated by it. A bad value is one line naming the field and its flag::

    lr (--lr): must be greater than 0, got -1.0
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from autobuild.errors import (
    MAX_SEED,
    InvalidValue,
    integer_text_problem,
    schema_error,
    schema_message,
)

__all__ = ["CLIP_FAMILIES", "DETECTION_CLIP_FAMILIES", "TrainConfig", "check_given",
           "check_milestones", "check_new_recipe", "check_resume", "flag_of"]

#: Families whose products of activations blow up without clipping (QuadraLib clips at 0.5).
CLIP_FAMILIES = {"quadratic": 0.5, "multiplicative": 0.5}
#: The same for detectors, whose SSD loss has gradient norms of 100-200 at the start: 0.5
#: all but stops a quadratic SSDlite, no clipping lets its weights explode, 10 trains it
#: (docs/benchmarks.md, Detection).
DETECTION_CLIP_FAMILIES = {"quadratic": 10.0, "multiplicative": 10.0}

PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


#: Fields whose only flag turns them off.
_NEGATIVE_FLAGS = {"nesterov": "--no-nesterov"}


def flag_of(field: str) -> str:
    return _NEGATIVE_FLAGS.get(field, "--" + field.replace("_", "-"))


def _name(loc: tuple[Any, ...]) -> str:
    field = str(loc[0]) if loc else "(recipe)"
    index = "".join(f"[{p}]" for p in loc[1:])
    return f"{field}{index} ({flag_of(field)})"


#: How a bad field is named in errors: as its flag, or (a search space) as the space's key.
_NAMES: ContextVar[tuple[str, Callable[[tuple[Any, ...]], str]]] = ContextVar(
    "autobuild_recipe_names", default=("", _name))


class TrainConfig(BaseModel):
    """A training recipe. Defaults are the usual CIFAR ResNet recipe (SGD + cosine).

    Values are never converted across types (``epochs=2.5`` and ``amp=1`` are refused); a
    bad field raises :class:`~autobuild.errors.InvalidValue` /
    :class:`~autobuild.errors.InvalidType` naming it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              allow_inf_nan=False, validate_default=False)

    epochs: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    batch_size: Annotated[int, Field(ge=1, le=1_048_576)] = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    #: Peak learning rate; None = 0.1 for SGD, 1e-3 for AdamW, scaled by the batch / 128 (the
    #: batch a step sees: the training set when it is smaller than batch_size). At most 1000
    #: (the optimizers' float32 arithmetic overflowed at 1e308: a crash, not a divergence).
    lr: Annotated[float, Field(gt=0, le=1000)] | None = None
    #: SGD momentum (a negative one is gradient ascent in disguise; 1 never forgets).
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    #: None = 5e-4 for SGD, 0.05 for AdamW; never applied to norms, biases, Dirac alpha/beta.
    weight_decay: Annotated[float, Field(ge=0, le=1000)] | None = None
    #: Linear warm-up length, capped at a quarter of the run so short runs still anneal.
    warmup_epochs: Annotated[float, Field(ge=0)] = 5.0
    #: "cosine" (to zero) or "multistep" (x lr_gamma at each of lr_milestones), after warm-up.
    lr_schedule: Literal["cosine", "multistep"] = "cosine"
    #: Epochs where "multistep" decays; None = at 2/3 and 11/12 of the run (SSD300's 80, 110
    #: of 120 epochs).
    lr_milestones: list[PositiveInt] | None = None
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    #: Side of the square cut out of each training image (DeVries & Taylor 2017; PDE-Global
    #: and DARTS train CIFAR with 16); 0 = off. Classifiers only.
    cutout: Annotated[int, Field(ge=0, le=4096)] = 0
    #: Drop path rate of DARTS cells at the end of the run (DARTS: 0.2): it rises linearly
    #: from 0. 0 = off; refused for a model without drop path.
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    #: Weight of an auxiliary tower's loss; None = 0.4 (DARTS's) for a model that has one
    #: (cifar_darts_v2_aux); 0 = the tower's loss counts for nothing. A weight above 0 is
    #: refused for a model without a tower.
    aux_weight: Annotated[float, Field(ge=0, le=10)] | None = None
    #: Max gradient norm; "auto" = 0.5 for quadratic/multiplicative plans (10 for detectors),
    #: else none; 0 = off. A negative norm would flip the gradient: refused.
    clip_grad: float | str = "auto"
    amp: bool = False
    amp_dtype: Literal["bf16", "fp16"] = "bf16"  # fp16 uses a GradScaler
    #: None = on for CUDA, off for CPU.
    channels_last: bool | None = None
    compile: bool = False
    #: EMA decay per step (e.g. 0.9999); None = no EMA. Evaluation and saving use the EMA.
    ema: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: Seed = 0
    deterministic: bool = False
    sync_bn: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    #: Data loader processes; None = min(8, cores) on CUDA, 0 on CPU.
    workers: Annotated[int, Field(ge=0, le=256)] | None = None
    #: Train-loss/accuracy synchronisation interval in steps (also the divergence check).
    log_interval: Annotated[int, Field(ge=1)] = 20
    progress: bool = False
    #: TensorBoard log directory (rank 0): scalars every epoch, histograms every
    #: ``tensorboard_every`` epochs. None = no logging. Recorded as an absolute path.
    tensorboard: Annotated[str, Field(min_length=1)] | None = None
    tensorboard_every: PositiveInt = 5

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise schema_error(exc, *_NAMES.get()) from None

    @classmethod
    def from_space(cls, data: dict[str, Any], source: str, key: str) -> TrainConfig:
        """A recipe from a search space's ``key`` (``budget``): a bad field is named as the
        space's key (``search space 'x.yaml': budget.lr``), not as a flag."""
        token = _NAMES.set((source, lambda loc: ".".join(p for p in (key, *map(str, loc))
                                                           if p)))
        try:
            return cls(**data)
        finally:
            _NAMES.reset(token)

    @field_validator("clip_grad", mode="before")
    @classmethod
    def _clip_grad(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, str):  # from the command line or an old record
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number >= 0 or auto") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError("must be a number >= 0 (0 = off) or auto")
        return float(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("lr_milestones")
    @classmethod
    def _milestones(cls, value: list[int] | None) -> list[int] | None:
        # (repeats are kept: each is a decay, and an older record may hold them; a new
        # recipe refuses them, check_new_recipe)
        return sorted(value) if value is not None else None

    @field_validator("tensorboard")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a directory path")
        return os.path.abspath(os.path.expanduser(value)) if value is not None else None

    # ---- resolved values ------------------------------------------------------------------
    def peak_lr(self, step_batch: int | None = None) -> float:
        """``lr``, or the optimizer's default scaled linearly (Goyal et al. 2017) by the
        images a step sees: ``step_batch`` (default ``batch_size``), which is smaller when
        the training set is."""
        if self.lr is not None:
            return self.lr
        base = 0.1 if self.optimizer == "sgd" else 1e-3
        return base * (step_batch or self.batch_size) / 128

    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def max_grad_norm(self, families: set[str], table: dict[str, float] | None = None
                      ) -> float | None:
        """The clipping norm: "auto" looks the plan's families up in ``table`` (default
        :data:`CLIP_FAMILIES`; detection passes :data:`DETECTION_CLIP_FAMILIES`)."""
        if self.clip_grad == "auto":
            table = CLIP_FAMILIES if table is None else table
            limits = [table[f] for f in families if f in table]
            return min(limits) if limits else None
        return float(self.clip_grad) or None

    def max_warmup(self) -> float:
        """The longest warm-up the run takes (epochs): a quarter of it, so that it anneals."""
        return self.epochs / 4

    def milestones(self) -> list[int]:
        """The epochs after which "multistep" multiplies the lr by ``lr_gamma``."""
        if self.lr_milestones is not None:
            return list(self.lr_milestones)
        return sorted({max(1, round(self.epochs * 2 / 3)), max(1, round(self.epochs * 11 / 12))})

    # ---- persistence ----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.model_fields[name].default

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A recipe from a record (a checkpoint's, a run's): keys of older versions that
        no longer exist are ignored; every known key is validated."""
        known = cls.model_fields
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ---- the command line -----------------------------------------------------------------
    @classmethod
    def flag_type(cls, name: str) -> Callable[[str], Any]:
        """An argparse ``type=`` for field ``name``: parses the flag's text and checks it
        against this schema at parse time (a bad ``--lr`` is refused before any work)."""
        info = cls.model_fields[name]
        annotation: Any = (Annotated[(info.annotation, *info.metadata)] if info.metadata
                           else info.annotation)
        if name == "lr_milestones":  # nargs="+": one element per call
            annotation = PositiveInt
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)

        def parse(text: str) -> Any:
            try:  # the text as the field's type, within its bounds...
                value = adapter.validate_strings(text)
            except ValidationError as exc:
                message = schema_message(exc, "", lambda loc: "").lstrip(": ")
                raise argparse.ArgumentTypeError(message) from None
            problem = integer_text_problem(text, value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            if name == "lr_milestones":
                return value
            try:  # ...and through the field's own validators
                return cls(**{name: value}).to_dict()[name]
            except InvalidValue as exc:
                raise argparse.ArgumentTypeError(str(exc).partition(": ")[2]) from None

        parse.__name__ = name  # argparse names the type in some messages
        return parse


def check_new_recipe(cfg: TrainConfig, key: str = "--", given: Collection[str] = ()) -> None:
    """What the schema cannot refuse without refusing older records (they stay readable):
    an AMP precision without AMP, a TensorBoard period without TensorBoard, milestones a
    new run would ignore (cosine) or never reach.
    ``key`` names the settings: ``--`` as flags, ``search space 'x.yaml': budget.`` as a
    space's keys. ``given`` names the settings the user gave (flags, budget keys): one that
    would change nothing is refused even at its default value."""

    def name(field: str) -> str:
        return f"{field} ({flag_of(field)})" if key == "--" else f"{key}{field}"

    # (the fix names a space's key without the file again: "set budget.lr_schedule ...")
    check_given(cfg, given, name, None if key == "--" else
                lambda field: key.rpartition(": ")[2] + field)
    if cfg.amp_dtype == "fp16" and not cfg.amp:  # (bf16 is the default)
        raise InvalidValue(f"{name('amp_dtype')} fp16: it sets the precision of AMP, which is "
                           f"off; turn on {name('amp')}")
    # (compared with the default, not "was it set": a replaced or recorded config sets all)
    every = TrainConfig.model_fields["tensorboard_every"].default
    if cfg.tensorboard_every != every and cfg.tensorboard is None:
        raise InvalidValue(f"{name('tensorboard_every')} {cfg.tensorboard_every}: it sets how "
                           f"often TensorBoard logs histograms, which is off; give "
                           f"{name('tensorboard')} DIR")
    check_milestones(cfg, name)


def check_milestones(cfg: TrainConfig, name: Callable[[str], str]) -> None:
    """Milestones once each, of the multistep schedule, within the run's epochs."""
    if cfg.lr_milestones is None:
        return
    twice = sorted({m for m in cfg.lr_milestones if cfg.lr_milestones.count(m) > 1})
    if twice:  # one decay meant, or two? say so rather than guess
        raise InvalidValue(f"{name('lr_milestones')} {cfg.lr_milestones}: epoch {twice[0]} "
                           "is given twice; give each milestone once")
    if cfg.lr_schedule != "multistep":
        raise InvalidValue(f"{name('lr_milestones')} {cfg.lr_milestones}: milestones apply to "
                           "the multistep schedule only; cosine has none")
    if max(cfg.lr_milestones) > cfg.epochs:
        raise InvalidValue(f"{name('lr_milestones')} {cfg.lr_milestones}: beyond the run's "
                           f"{cfg.epochs} epochs; give epochs of the run")


def check_given(cfg: TrainConfig, given: Collection[str], name: Callable[[str], str],
                short: Callable[[str], str] | None = None) -> None:
    """Refuse a setting the user gave that the rest of the recipe makes idle (``name``
    spells a field as the user wrote it; ``short``, in the fix, as the user would set it)."""
    short = short or name
    idle = {"amp_dtype": (not cfg.amp, "it sets the precision of AMP, which is off",
                          f"turn on {short('amp')}"),
            "tensorboard_every": (cfg.tensorboard is None, "it sets how often TensorBoard "
                                  "logs histograms, which is off",
                                  f"give {short('tensorboard')} DIR"),
            "lr_gamma": (cfg.lr_schedule != "multistep", "it is the multistep schedule's "
                         "factor, and the schedule is cosine",
                         f"set {short('lr_schedule')} multistep"),
            "lr_milestones": (cfg.lr_schedule != "multistep", "milestones apply to the "
                              "multistep schedule only, and the schedule is cosine",
                              f"set {short('lr_schedule')} multistep"),
            "momentum": (cfg.optimizer != "sgd", "it is SGD's momentum, and the optimizer is "
                         f"{cfg.optimizer}", f"set {short('optimizer')} sgd"),
            # (off with momentum 0 is consistent: nothing to refuse; on, it would be idle)
            "nesterov": (cfg.optimizer != "sgd" or (cfg.momentum == 0 and cfg.nesterov),
                         f"it is SGD's, and the optimizer is {cfg.optimizer}"
                         if cfg.optimizer != "sgd" else "Nesterov momentum needs a momentum "
                         "above 0, and the momentum is 0",
                         f"set {short('optimizer')} sgd" if cfg.optimizer != "sgd" else
                         f"give {short('momentum')} above 0")}
    for field, (idle_now, why, fix) in idle.items():
        if field in given and idle_now:
            raise InvalidValue(f"{name(field)} {getattr(cfg, field)}: {why}; {fix}, or leave "
                               "it out")
    if "warmup_epochs" in given and cfg.warmup_epochs > cfg.max_warmup():
        raise InvalidValue(f"{name('warmup_epochs')} {cfg.warmup_epochs:g}: the warm-up is at "
                           f"most a quarter of the run ({cfg.max_warmup():g} of its {cfg.epochs} "
                           "epochs), so that it anneals; give at most that, or leave it out "
                           "(a default warm-up is capped so)")


def check_resume(cfg: TrainConfig, done: int, saved: Mapping[str, Any] | None = None,
                 optimizer_key: str = "optimizer") -> None:
    """A resumed run must have epochs left: ``--epochs`` below what is done is refused
    before anything is written (it would rewrite the run's record for nothing). It keeps
    the optimizer whose state the checkpoint holds (``saved``: the checkpoint's recipe)."""
    before = (saved or {}).get("optimizer", "sgd")
    if saved is not None and cfg.optimizer != before:
        raise InvalidValue(f"{optimizer_key} {cfg.optimizer}: the run trains with "
                           f"{before}, whose state its checkpoint holds; a resumed run keeps "
                           f"its optimizer (`autobuild train RUN --optimizer {cfg.optimizer} "
                           "--out NEW` starts a new run from its weights)")
    if cfg.epochs <= done:
        raise InvalidValue(f"epochs (--epochs) {cfg.epochs}: the run has already trained "
                           f"{done} epoch{'s' if done != 1 else ''}; pass --epochs N with "
                           f"N > {done} to train further")
