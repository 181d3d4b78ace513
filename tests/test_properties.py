"""Property-based tests (hypothesis, issue 12): any plan file, placement file, family option
or `--option` list either loads or raises AutobuildError, never another exception."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autobuild.cli._common import parse_options
from autobuild.errors import AutobuildError
from autobuild.io import load_placement, load_plan
from autobuild.rewrite import Placement
from autobuild.variants import list_variants

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

NAMES = st.sampled_from(["conv1", "layer1", "layer1.0.conv1", "layer3", "fc", "model",
                         "placement", "autobuild_plan", "conversions", "init", "num_classes",
                         "input_size", "weights", "family", "options", "sites", "K", "type"])
FAMILIES = st.sampled_from(["quadratic", "quadratic:ours", "quadratic:type=t4",
                            "pde-global:K=2", "pde-global:K=2.5", "dirac:folded=2",
                            "multiplicative:expansion=1e9", "parameter-free", "keep", "cubic",
                            "", ":", "quadratic:type", "quadratic:=", "pde-global:dt=nan"])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | NAMES | FAMILIES)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(NAMES | st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)


def _plan_dict() -> dict[str, Any]:
    return {"autobuild_plan": 1, "model": "cifar_resnet20", "init": "scratch",
            "num_classes": 10, "input_size": [3, 32, 32],
            "conversions": [{"family": "quadratic", "options": {"type": "ours"},
                             "sites": ["layer1.0.conv1"]}]}


def _loads_or_refuses(load: Any, text: str, name: str = "file.yaml") -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            load(path)
        except AutobuildError:
            pass


@SETTINGS
@given(st.dictionaries(NAMES | st.text(max_size=8), VALUES, max_size=5))
def test_any_placement_mapping_loads_or_refuses(data: dict[Any, Any]) -> None:
    _loads_or_refuses(load_placement, yaml.safe_dump(data))
    try:
        Placement(data)
    except AutobuildError:
        pass


@SETTINGS
@given(VALUES)
def test_any_yaml_document_as_a_placement_or_plan(data: Any) -> None:
    text = yaml.safe_dump(data)
    _loads_or_refuses(load_placement, text)
    _loads_or_refuses(load_plan, text)


@SETTINGS
@given(st.text(max_size=200))
def test_any_text_as_a_placement_or_plan(text: str) -> None:
    _loads_or_refuses(load_placement, text)
    _loads_or_refuses(load_plan, text)
    _loads_or_refuses(load_plan, text, "plan.json")


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(sorted(_plan_dict())) | st.text(max_size=6),
                          VALUES), min_size=1, max_size=3),
       st.lists(st.sampled_from(sorted(_plan_dict())), max_size=2))
def test_a_plan_with_keys_changed_or_dropped(changes: list[tuple[str, Any]],
                                             dropped: list[str]) -> None:
    plan = _plan_dict()
    for key, value in changes:
        plan[key] = value
    for key in dropped:
        plan.pop(key, None)
    _loads_or_refuses(load_plan, yaml.safe_dump(plan))
    _loads_or_refuses(load_placement, yaml.safe_dump(plan))


@SETTINGS
@given(st.sampled_from([v.name for v in list_variants()]),
       st.dictionaries(st.text(max_size=10), VALUES, max_size=3),
       st.data())
def test_any_family_options_parse_or_refuse(family: str, extra: dict[str, Any],
                                            data: st.DataObject) -> None:
    variant = next(v for v in list_variants() if v.name == family)
    names = [o.name for o in variant.options]
    options: dict[Any, Any] = dict(extra)
    if names:
        for name in data.draw(st.lists(st.sampled_from(names), max_size=len(names))):
            options[name] = data.draw(VALUES)
    try:
        parsed = variant.parse_options(options)
    except AutobuildError:
        return
    for option in variant.options:  # what parses is of the declared type and in bounds
        value = parsed[option.name]
        if value in option.specials or value == option.default:
            continue
        assert option.parse(value, family) == value


@SETTINGS
@given(st.lists(st.text(max_size=20), max_size=5))
def test_any_option_flags_parse_or_refuse(pairs: list[str]) -> None:
    try:
        options = parse_options(pairs)
    except AutobuildError:
        return
    assert all(isinstance(k, str) and k for k in options)
