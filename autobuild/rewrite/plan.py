"""Plans: the contract between the CLI, the search and saved models.

A plan names a baseline, how to build it (classes, input size, weights, leaf modules, builder
arguments such as ``drop_path_rate``), the init, and a
:class:`~autobuild.rewrite.placement.Placement`. Building the same plan always yields the
same module structure, so a saved model is a plan plus a safetensors file.

Written form (``autobuild_plan: 2``), sites grouped by identical choice::

    autobuild_plan: 2
    model: resnet50
    init: preserve
    conversions:
    - family: quadratic
      options: {type: ours, ...}      # every option, defaults included
      sites: [layer1.0.conv1, ...]

Version 1 plans (the same shape, applied in order) are read as one placement; a site named
twice is refused. Reading and writing files is :mod:`autobuild.io`'s job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from autobuild.errors import (
    AutobuildError,
    InfeasiblePlacement,
    InvalidValue,
    check_num_classes,
    in_context,
)
from autobuild.rewrite.placement import Choice, Placement

__all__ = ["INITS", "PLAN_VERSION", "Conversion", "Plan", "dump_yaml", "load_yaml", "yaml_problem"]

#: 3: every option of every conversion is recorded (plans of version 2 may omit options
#: added later; a family's ``legacy_defaults`` say what their omission meant).
PLAN_VERSION = 3
INITS = ("scratch", "preserve")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: a
    hand-edited file where the second ``layer1.0.conv1:`` silently wins loses the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The mapping's own keys only: a key after a merge (``<<: *base``) overrides the
        # merged one, as YAML means it to.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key: PyYAML refuses it itself
            # (True and 1 are one key of the dict made: refused too, rather than one lost)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats: PyYAML (YAML 1.1) reads `lr: 1e-3` and `1e9` (no dot) as text, and a
# file would then be refused for a number its author wrote as one.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                       list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting the strings :func:`load_yaml` reads as floats (`1e3`)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                              list("-+0123456789."))


def dump_yaml(data: Any, **kwargs: Any) -> str:
    """``yaml.safe_dump`` whose text :func:`load_yaml` reads back as the same values."""
    return yaml.dump(data, Dumper=_Dumper, **kwargs)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in a mapping (JSON is YAML)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (as :func:`load_yaml` does)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice; keep one")
        out[key] = value
    return out


def yaml_problem(exc: BaseException) -> str:
    """The first line of a YAML (or decoding) error, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Conversion:
    """Convert ``sites`` (names from ``autobuild sites``) with ``family`` and ``options``."""

    family: str
    options: dict[str, Any] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)


def _placement_of(conversions: Sequence[Conversion]) -> Placement:
    choices: dict[str, Choice] = {}
    for conv in conversions:
        choice = Choice.of(conv.family, conv.options)
        for site in conv.sites:
            if site in choices:
                raise InfeasiblePlacement(f"site {site} is named twice ({choices[site]} and "
                                          f"{choice}); a site takes one choice")
            choices[site] = choice
    return Placement(choices)


class Plan:
    """A baseline + a placement + the init: everything needed to rebuild a converted model."""

    def __init__(self, model: str, placement: Placement | Mapping[str, Any] |
                 Sequence[Conversion] | None = None, init: str = "scratch",
                 num_classes: int | None = None, input_size: Sequence[int] | None = None,
                 weights: str | None = None, leaf_modules: Sequence[str] = (),
                 version: int = PLAN_VERSION, *,
                 model_args: Mapping[str, Any] | None = None) -> None:
        if isinstance(placement, Placement):
            self.placement = placement
        elif placement is None or isinstance(placement, Mapping):
            self.placement = Placement(placement or {})
        else:
            self.placement = _placement_of(placement)
        if init not in INITS:
            raise InvalidValue(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        self.model = model
        self.init = init
        self.num_classes = num_classes
        self.input_size = tuple(int(v) for v in input_size) if input_size else None
        self.weights = weights
        self.leaf_modules = [str(m) for m in leaf_modules]
        #: The baseline builder's arguments (checked with their bounds where it is built).
        self.model_args = dict(model_args or {})
        self.version = PLAN_VERSION
        #: The version the plan was written at (a plan is always saved at PLAN_VERSION;
        #: loading needs the old one to know which weights the file may lack).
        self.written_version = version

    @property
    def conversions(self) -> list[Conversion]:
        """The placement grouped by identical choice, in canonical order."""
        return [Conversion(choice.family, choice.opts, sites)
                for choice, sites in self.placement.groups()]

    @property
    def family(self) -> str:
        """The family of a single-family plan ("mixed" otherwise, "" for none)."""
        families = self.placement.families
        return families.pop() if len(families) == 1 else ("mixed" if families else "")

    @property
    def sites(self) -> list[str]:
        return list(self.placement)

    def replace(self, **changes: Any) -> Plan:
        data = {"model": self.model, "placement": self.placement, "init": self.init,
                "num_classes": self.num_classes, "input_size": self.input_size,
                "weights": self.weights, "leaf_modules": self.leaf_modules,
                "model_args": self.model_args, **changes}
        return Plan(**data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Plan({self.model!r}, {self.placement.summary()}, init={self.init})"

    def to_dict(self) -> dict[str, Any]:
        data = {
            "autobuild_plan": self.version,
            "model": self.model,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size) if self.input_size else None,
            "weights": self.weights,
            "init": self.init,
            "leaf_modules": list(self.leaf_modules),
            "conversions": [{"family": c.family, "options": dict(c.options),
                             "sites": list(c.sites)} for c in self.conversions],
        }
        if self.model_args:  # only when given: other plans read as they always did
            data["model_args"] = dict(self.model_args)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        try:
            if not isinstance(data, dict) or "autobuild_plan" not in data:
                raise ValueError("not an autobuild plan (no 'autobuild_plan' key)")
            version = data["autobuild_plan"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"autobuild_plan must be a positive integer, got {version!r}")
            if version > PLAN_VERSION:
                raise ValueError(f"plan version {version} is newer than this autobuild "
                                 f"understands ({PLAN_VERSION})")
            known = {"autobuild_plan", "model", "num_classes", "input_size", "weights", "init",
                     "leaf_modules", "conversions", "model_args"}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")
            model = data.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("'model' must be a baseline name")
            convs = data.get("conversions") or []
            if not isinstance(convs, list):
                raise ValueError("'conversions' must be a list")
            conversions = [_with_legacy_defaults(_conversion(c, i), version)
                           for i, c in enumerate(convs)]
            num_classes = data.get("num_classes")
            if num_classes is not None:
                check_num_classes(num_classes, "'num_classes'")
            size = data.get("input_size")
            if size is not None and not (isinstance(size, list) and len(size) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                raise ValueError(f"'input_size' must be [C, H, W] positive integers, got {size!r}")
            weights = data.get("weights")
            if weights is not None and not isinstance(weights, str):
                raise ValueError("'weights' must be a path or a weights name")
            init = data.get("init", "scratch")
            leaves = data.get("leaf_modules") or []
            if not isinstance(leaves, list) or not all(isinstance(m, str) for m in leaves):
                raise ValueError("'leaf_modules' must be a list of names")
            args = data.get("model_args") or {}
            if not isinstance(args, dict) or not all(
                    isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
                    for k, v in args.items()):
                raise ValueError("'model_args' must map argument names to numbers or strings")
            return cls(model, conversions, init, num_classes, size, weights, leaves, version,
                       model_args=args)
        except AutobuildError as exc:
            raise in_context(exc, f"plan {source}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise AutobuildError(f"corrupt plan {source}: {exc}") from exc

    # ---- text ------------------------------------------------------------------------
    def dumps(self, fmt: str = "yaml") -> str:
        _check_format(fmt)
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return dump_yaml(self.to_dict(), sort_keys=False)

    @classmethod
    def loads(cls, text: str, *, fmt: str = "yaml", source: str = "plan") -> Plan:
        _check_format(fmt)
        try:
            data = (json.loads(text, object_pairs_hook=_unique_keys) if fmt == "json"
                    else load_yaml(text))
        except (json.JSONDecodeError, yaml.YAMLError, ValueError) as exc:
            raise AutobuildError(f"corrupt plan {source}: {yaml_problem(exc)}") from exc
        return cls.from_dict(data, source)


def _check_format(fmt: Any) -> None:
    if fmt not in ("yaml", "json"):
        raise InvalidValue(f"unknown plan format {fmt!r}; valid: yaml, json")


def _with_legacy_defaults(conversion: Conversion, version: int) -> Conversion:
    """Fill the options a plan of an older ``version`` omits with the defaults they had then
    (a saved model must rebuild to the network it was, not to today's defaults)."""
    from autobuild.rewrite.family import get_family

    try:
        legacy = get_family(conversion.family).legacy_defaults
    except AutobuildError:  # an unknown family is reported where the plan is built
        return conversion
    for since, defaults in sorted(legacy.items()):
        if version <= since:
            for name, value in defaults.items():
                conversion.options.setdefault(name, value)
    return conversion


def _conversion(data: Any, index: int) -> Conversion:
    if not isinstance(data, dict):
        raise ValueError(f"conversions[{index}] must be a mapping with family/options/sites")
    family, options, sites = data.get("family"), data.get("options") or {}, data.get("sites")
    if not isinstance(family, str):
        raise ValueError(f"conversions[{index}].family must be a family name")
    if not isinstance(options, dict):
        raise ValueError(f"conversions[{index}].options must be a mapping")
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise ValueError(f"conversions[{index}].sites must be a list of site names")
    return Conversion(family, dict(options), list(sites))
