"""Search spaces: a YAML file (``search_spaces/*.yaml``) validated by pydantic.

    name: cifar10-resnet20-quadratic
    baseline: cifar_resnet20
    data: imagefolder:../shared/data/cifar10-mini
    groups:                          # decided in order; each group is one choice...
      - sites: "layer1.*.conv*"
        choices: [keep, quadratic:ours, quadratic:t4]
      - sites: ["layer3.*.conv*"]
        choices: [keep, quadratic:ours]
        per_site: true                # ...or one choice per matching site
    objectives: [top1, macs]         # top1 (max); macs, params, flops, latency_ms (min)
    constraints: ["macs <= 1.2 * baseline"]
    budget: {epochs: 3, batch_size: 128, train_subset: 2000}   # any `autobuild train` recipe key
    sampler: nsga2                   # default (Optuna's), nsga2, tpe, random, bruteforce
    seed: 0
    n_trials: 20

Every key is checked with its type and bounds, and values are never converted across types
(``epochs: 1.0``, ``seed: true``, ``keep_weights: 1`` are refused; an int is a valid float);
an error names the key (``budget.epochs``) and what is allowed. ``--set key.sub=value``
overrides any key before validation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)

from autobuild.errors import MAX_SEED, NAME_PATTERN, AutobuildError, schema_error
from autobuild.rewrite.plan import dump_yaml, load_yaml, yaml_problem

__all__ = ["OBJECTIVES", "Constraint", "Group", "SearchSpace", "load_space"]

#: Objective name -> direction.
OBJECTIVES = {"top1": "maximize", "macs": "minimize", "params": "minimize",
              "flops": "minimize", "latency_ms": "minimize"}
SAMPLERS = ("default", "nsga2", "tpe", "random", "bruteforce")
_CONSTRAINT = re.compile(r"^\s*(macs|params|flops|latency_ms)\s*(<=|>=)\s*"
                         r"(?:([0-9.eE+]+)\s*\*\s*)?(baseline|[0-9.eE+]+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Group(_Strict):
    """Sites (glob patterns) and the choices they may take (``keep`` is always added)."""

    sites: list[str] = Field(min_length=1)
    choices: list[str] = Field(min_length=1)
    per_site: StrictBool = False
    name: str | None = None

    @field_validator("sites", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("choices", mode="before")
    @classmethod
    def _choices(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out = ["keep"] + [v for v in value if v != "keep"]  # keep always, and first
        return [str(v) if not isinstance(v, dict) else json.dumps(v, sort_keys=True)
                for v in out]

    @field_validator("choices")
    @classmethod
    def _known_choices(cls, value: list[str]) -> list[str]:
        """Each choice names a family and options it has (a typo is refused here, naming
        the space and the key, rather than when the study starts)."""
        from autobuild.rewrite import Choice

        for text in value:
            try:
                Choice.parse(json.loads(text) if text.startswith("{") else text)
            except AutobuildError as exc:
                raise ValueError(f"choice {text!r}: {exc}") from None
        return value


class Constraint(_Strict):
    """``metric <= value`` or ``metric <= k * baseline`` (also >=)."""

    metric: Literal["macs", "params", "flops", "latency_ms"]
    op: Literal["<=", ">="]
    factor: float
    relative: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> Constraint:
        m = _CONSTRAINT.match(text)
        shape = ValueError(f"constraint {text!r} must look like 'macs <= 1.2 * baseline' or "
                           "'params <= 5e6' (metrics: macs, params, flops, latency_ms)")
        if not m:
            raise shape
        metric, op, factor, rhs = m.groups()
        relative = rhs == "baseline"
        try:  # (the pattern lets "2..3" through: float() is the judge)
            value = float(factor or 1.0) if relative else float(rhs) * float(factor or 1.0)
        except ValueError:
            raise shape from None
        if not math.isfinite(value) or value > (1e6 if relative else 1e18):
            raise ValueError(f"constraint {text!r}: the bound must be a finite number, at most "
                             f"{'1e6 * baseline' if relative else '1e18'}")
        return cls(metric=metric, op=op, factor=value, relative=relative, text=text.strip())

    def bound(self, baseline: dict[str, float]) -> float:
        return self.factor * baseline[self.metric] if self.relative else self.factor

    def violation(self, values: dict[str, float], baseline: dict[str, float]) -> float:
        """Optuna's convention: <= 0 is feasible (relative to the bound, so it is scale-free)."""
        bound = self.bound(baseline)
        excess = values[self.metric] - bound if self.op == "<=" else bound - values[self.metric]
        return excess / max(abs(bound), 1e-12)


class Seeding(_Strict):
    """The first trials, enqueued before the sampler proposes any."""

    baseline: StrictBool = True
    all_converted: StrictBool = True
    #: Revert the top-k sites by RI (from a short importance run on the all-converted net).
    revert_top_ri: StrictInt = Field(default=3, ge=0, le=64)
    #: RI is measured on the all-converted network after this many of its epochs (or at
    #: its end, if it trains fewer), and the reverts are queued then.
    importance_epochs: StrictInt = Field(default=1, ge=1, le=1000)


class Pruning(_Strict):
    """Early stopping of weak trials (see :mod:`autobuild.search.pruning`)."""

    enabled: StrictBool = True
    warmup_epochs: StrictInt = Field(default=1, ge=0)
    #: A trial stops when at least this many finished trials dominate it at the same epoch.
    min_dominators: StrictInt = Field(default=2, ge=1)
    #: Accuracy slack (percentage points) before another trial counts as better.
    margin: StrictFloat = Field(default=0.0, ge=0.0, le=100.0)

    @field_validator("margin", mode="before")
    @classmethod
    def _exponent(cls, value: Any) -> Any:
        """YAML 1.1 reads ``1e-1`` (no dot) as text: take it as the number it spells."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value


class Budget(_Strict):
    """Per-trial training budget: any ``autobuild train`` recipe key, plus the data subset."""

    model_config = ConfigDict(extra="allow", frozen=True)
    epochs: StrictInt = Field(default=3, ge=1, le=10_000)
    batch_size: StrictInt = Field(default=128, ge=1, le=65_536)
    train_subset: StrictInt | None = Field(default=None, ge=1)
    image_size: StrictInt | None = Field(default=None, ge=8, le=4096)


class SearchSpace(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    baseline: str = Field(min_length=1)
    #: The baseline builder's arguments (``autobuild.models.MODEL_ARGS``).
    model_args: dict[str, Any] = Field(default_factory=dict)
    num_classes: StrictInt | None = Field(default=None, ge=1)
    input_size: tuple[StrictInt, StrictInt, StrictInt] | None = None
    data: str = Field(min_length=1)
    data_dir: str | None = None
    groups: list[Group] = Field(min_length=1)
    objectives: list[str] = Field(default=["top1", "macs"], min_length=1, max_length=4)
    constraints: list[str] = Field(default_factory=list)
    budget: Budget = Budget()
    init: Literal["scratch", "preserve"] = "scratch"
    sampler: str = "default"
    seed: StrictInt = Field(default=0, ge=0, le=MAX_SEED)
    n_trials: StrictInt = Field(default=20, ge=1, le=100_000)
    seeding: Seeding = Seeding()
    pruning: Pruning = Pruning()
    keep_weights: StrictBool = False
    device: str = "auto"
    _source: str = PrivateAttr(default="")  # the file it was read from, for messages

    def key(self, name: str = "") -> str:
        """How a message names key ``name`` (``budget.epochs``) of this space: with the
        file it was read from, when it was read from one."""
        return f"search space {self._source}: {name}" if self._source else \
            f"search space {name}"

    @field_validator("model_args")
    @classmethod
    def _model_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        from autobuild.models import check_model_args

        try:
            return check_model_args(value, source="")
        except AutobuildError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("groups")
    @classmethod
    def _group_names(cls, value: list[Group]) -> list[Group]:
        """Each group is one Optuna parameter, named by the group (``g<i>`` when unnamed):
        two groups of one name would be one parameter with two sets of choices."""
        seen: dict[str, int] = {}
        for i, group in enumerate(value):
            label = group.name or f"g{i}"
            if label.startswith("site:"):  # (the per-site parameters' prefix)
                raise ValueError(f"group {i}'s name {label!r} starts with 'site:', the "
                                 "prefix of per-site parameters; choose another")
            if label in seen:
                what = f"name {label!r}" if group.name else f"default name {label!r}"
                raise ValueError(f"group {i}'s {what} is also group {seen[label]}'s; give "
                                 "each group its own name (it names the group's Optuna "
                                 "parameter)")
            seen[label] = i
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
        if len(set(value)) != len(value):
            raise ValueError("objectives are listed twice")
        return value

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for text in value:
            Constraint.parse(text)
        return value

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; valid: {', '.join(SAMPLERS)}")
        return value

    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(t) for t in self.constraints]

    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def fingerprint(self) -> str:
        """What defines the study's trials (the space minus run-time settings): a study
        refuses to be continued with a different one."""
        # (without model_args when there are none: the studies of older spaces continue)
        skip = {"n_trials", "device"} | (set() if self.model_args else {"model_args"})
        data = self.model_dump(mode="json", exclude=skip)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


    def differences(self, recorded: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, recorded value, this space's value) for each key of the fingerprint that
        differs from ``recorded`` (a study's stored space), in dotted ``--set`` notation;
        :data:`UNSET` for a key one of them lacks."""
        skip = {"n_trials", "device"} | (set() if self.model_args else {"model_args"})
        here = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        there = {k: v for k, v in recorded.items() if k not in skip}
        return _differences(there, here, "")


#: A key one of two spaces does not have (a budget key given in one only).
UNSET = type("Unset", (), {"__repr__": lambda self: "not set"})()


def _differences(there: Any, here: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(there, dict) and isinstance(here, dict):
        return [d for k in sorted(set(there) | set(here), key=str)
                for d in _differences(there.get(k, UNSET), here.get(k, UNSET),
                                      f"{prefix}{k}.")]
    if isinstance(there, list) and isinstance(here, list) and len(there) == len(here) and \
            any(isinstance(v, dict) for v in there + here):  # (groups: by index)
        return [d for i, (a, b) in enumerate(zip(there, here, strict=True))
                for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if there == here else [(prefix.rstrip("."), there, here)]


def set_flag(key: str, value: Any) -> str:
    """The ``--set`` flag that gives ``key`` this ``value``, quoted for a shell (a list or
    mapping as JSON, which is YAML)."""
    import shlex

    if isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = dump_yaml(value, width=10_000).strip().removesuffix("...").strip()
    return f"--set {shlex.quote(f'{key}={text}')}"


def _set(data: dict[str, Any], assignment: str) -> None:
    """``key.sub=value``; a number indexes a list (``groups.0.choices=[keep, dirac]``)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise AutobuildError(f"--set takes key.sub=value, got {assignment!r}")
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise AutobuildError(f"--set {key}: {'.'.join(parts[:i]) or 'the space'} is a "
                                     f"list of {len(node)}; index it with 0..{len(node) - 1}")
            part = int(part)  # type: ignore[assignment]
        elif not isinstance(node, dict):
            raise AutobuildError(f"--set {key}: {'.'.join(parts[:i])!r} is not a mapping or "
                                 "a list in the space")
        if last:
            break
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = node[part]
    try:
        node[part] = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise AutobuildError(f"--set {key}: value {value!r} is not valid YAML") from exc


def load_space(path_or_data: str | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
               ) -> SearchSpace:
    """A validated search space from a YAML file (or a dict), with ``key.sub=value``
    overrides applied first. Relative ``data``/``data_dir`` paths in a file are resolved
    against the current directory and recorded absolute."""
    source = "(dict)"
    if isinstance(path_or_data, str):
        source = repr(path_or_data)
        if os.path.isdir(path_or_data):
            raise AutobuildError(f"search space {path_or_data!r} is a directory; give a YAML "
                                 "file (see search_spaces/)")
        if not os.path.isfile(path_or_data):
            raise AutobuildError(f"search space {path_or_data!r} does not exist")
        try:
            with open(path_or_data, encoding="utf-8") as f:
                data = load_yaml(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise AutobuildError(f"search space {source} is not valid YAML: "
                                 f"{yaml_problem(exc)}") from exc
    else:
        data = json.loads(json.dumps(path_or_data))
    if not isinstance(data, dict):
        raise AutobuildError(f"search space {source} must be a mapping of keys (name, baseline, "
                             "data, groups, ...)")
    for assignment in overrides:
        _set(data, assignment)
    if isinstance(data.get("data"), str) and data["data"].startswith("imagefolder:"):
        data["data"] = "imagefolder:" + os.path.abspath(data["data"][len("imagefolder:"):])
    if isinstance(data.get("data_dir"), str):
        data["data_dir"] = os.path.abspath(os.path.expanduser(data["data_dir"]))
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, f"search space {source}: ") from None
    if isinstance(path_or_data, str):
        space._source = source
    return space
