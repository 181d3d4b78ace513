"""Plans: round trips through YAML/JSON and clear errors for corrupt files."""

from __future__ import annotations

import pytest

import autobuild
from autobuild.errors import AutobuildError
from autobuild.rewrite import Conversion, Plan, apply_plan


def _plan() -> Plan:
    return Plan("cifar_resnet20", [Conversion("quadratic", {"type": "t4"}, ["layer1.0.conv1"])],
                "scratch", 10, (3, 32, 32))


@pytest.mark.parametrize("name", ["plan.yaml", "plan.json"])
def test_round_trip(tmp_path, name: str) -> None:
    path = str(tmp_path / name)
    _plan().save(path)
    assert Plan.load(path).to_dict() == _plan().to_dict()
    assert Plan.load(str(tmp_path)).model == "cifar_resnet20"


def test_apply_plan_builds_what_it_names() -> None:
    converted = apply_plan(_plan())
    assert [c.site for c in converted.changes] == ["layer1.0.conv1"]
    assert type(converted.model.layer1[0].conv1).__name__ == "QuadraticConv2d"
    assert converted.plan.family == "quadratic"


def test_plan_naming_a_missing_site_fails_clearly() -> None:
    plan = _plan()
    plan.conversions[0].sites = ["layer9.conv1"]
    with pytest.raises(AutobuildError, match="does not have"):
        apply_plan(plan)


@pytest.mark.parametrize("text", ["model: [unclosed", "just a string", "autobuild_plan: 1\n",
                                  "autobuild_plan: 99\nmodel: x\n"])
def test_corrupt_plans(tmp_path, text: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(AutobuildError, match="corrupt plan"):
        Plan.load(str(path))


def test_mixed_plan_applies_conversions_in_order() -> None:
    plan = Plan("cifar_resnet20", [
        Conversion("quadratic", {"type": "t4"}, ["layer1.0.conv1"]),
        Conversion("quadratic", {"type": "ours"}, ["layer2.0.conv1"]),
    ], "scratch", 10, (3, 32, 32))
    m = apply_plan(plan).model
    assert m.layer1[0].conv1.qtype == "t4" and m.layer2[0].conv1.qtype == "ours"
    assert autobuild.plan_of(m).family == "quadratic"
