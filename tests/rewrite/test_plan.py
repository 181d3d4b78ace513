"""Plans: round trips through YAML/JSON and clear errors for corrupt files."""

from __future__ import annotations

import pytest

import autobuild
from autobuild.errors import AutobuildError
from autobuild.io import load_plan, save_plan
from autobuild.rewrite import Conversion, Plan, record_of


def _plan() -> Plan:
    return Plan("cifar_resnet20", [Conversion("quadratic", {"type": "t4"}, ["layer1.0.conv1"])],
                "scratch", 10, (3, 32, 32))


@pytest.mark.parametrize("name", ["plan.yaml", "plan.json"])
def test_round_trip(tmp_path, name: str) -> None:
    path = str(tmp_path / name)
    save_plan(_plan(), path)
    assert load_plan(path).to_dict() == _plan().to_dict()
    assert load_plan(str(tmp_path)).model == "cifar_resnet20"


def test_apply_plan_builds_what_it_names() -> None:
    model = autobuild.build_plan(_plan())
    assert [c.site for c in record_of(model).changes] == ["layer1.0.conv1"]
    assert type(model.layer1[0].conv1).__name__ == "QuadraticConv2d"
    assert autobuild.plan_of(model).family == "quadratic"


def test_plan_naming_a_missing_site_fails_clearly() -> None:
    plan = Plan("cifar_resnet20", [Conversion("quadratic", {"type": "t4"}, ["layer9.conv1"])],
                "scratch", 10, (3, 32, 32))
    with pytest.raises(AutobuildError, match="has no site 'layer9.conv1'"):
        autobuild.build_plan(plan)


@pytest.mark.parametrize("text", ["model: [unclosed", "just a string", "autobuild_plan: 1\n",
                                  "autobuild_plan: 99\nmodel: x\n",
                                  "autobuild_plan: 3\nmodel: a\nmodel: b\n"])
def test_corrupt_plans(tmp_path, text: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(AutobuildError, match="corrupt plan"):
        load_plan(str(path))


def test_mixed_plan_is_one_placement() -> None:
    plan = Plan("cifar_resnet20", [
        Conversion("quadratic", {"type": "t4"}, ["layer1.0.conv1"]),
        Conversion("quadratic", {"type": "ours"}, ["layer2.0.conv1"]),
    ], "scratch", 10, (3, 32, 32))
    m = autobuild.build_plan(plan)
    assert m.layer1[0].conv1.qtype == "t4" and m.layer2[0].conv1.qtype == "ours"
    assert autobuild.plan_of(m).family == "quadratic"


def test_an_older_plan_means_the_defaults_of_its_time() -> None:
    # pde-global's coefficient BN eps became the official code's (= channels) in plan
    # version 3; a version-2 plan, which had no bn_eps, built PyTorch's 1e-5.
    import torch
    import yaml

    from autobuild.rewrite import PLAN_VERSION, Plan

    current = autobuild.plan_of(autobuild.convert("cifar_resnet20", "pde-global"))
    data = yaml.safe_load(current.dumps())
    assert data["autobuild_plan"] == PLAN_VERSION == 3
    assert data["conversions"][0]["options"]["bn_eps"] == "channels"
    del data["conversions"][0]["options"]["bn_eps"]
    assert Plan.from_dict(dict(data)).conversions[0].options["bn_eps"] == "channels"
    data["autobuild_plan"] = 2
    old = Plan.from_dict(data)
    assert old.conversions[0].options["bn_eps"] == "1e-5"
    model = autobuild.api.build_plan(old)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert 1e-5 in eps and not any(e >= 1 for e in eps)


def test_a_json_plan_with_a_key_given_twice_is_refused(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"autobuild_plan": 3, "model": "a", "model": "b"}')
    with pytest.raises(AutobuildError, match="corrupt plan .*key 'model' is given twice"):
        load_plan(str(path))


def test_a_plan_naming_a_leaf_the_model_lacks_is_refused(tmp_path, capsys) -> None:
    """Analysis refuses a misspelt leaf; a hand-edited plan given as --plan must not get past
    it either (the leaf would silently be traced through). A saved model whose plan names a
    leaf class the model has no instance of (harmless) still loads."""
    from torch import nn

    from autobuild.cli import main

    path = tmp_path / "plan.yaml"
    path.write_text(Plan("cifar_resnet20", [], "scratch", 10, (3, 32, 32),
                         leaf_modules=["nosuch"]).dumps())
    assert main(["convert", "--plan", str(path)]) == 2
    assert "plan leaf_modules: unknown leaf module 'nosuch'" in capsys.readouterr().err
    saved = str(tmp_path / "saved")
    autobuild.save(autobuild.convert("cifar_resnet20", "quadratic",
                                     leaf_modules=[nn.MultiheadAttention]), saved)
    assert autobuild.plan_of(autobuild.load(saved)).leaf_modules == ["MultiheadAttention"]
    assert main(["inspect", saved]) == 0


def test_yaml_keys_given_twice_and_merge_keys() -> None:
    from autobuild.rewrite.plan import load_yaml

    # a key after a merge overrides the merged one, as YAML means it to
    merged = load_yaml("b: &b {epochs: 1, lr: 2}\nc:\n  <<: *b\n  epochs: 2\n")
    assert merged["c"] == {"epochs": 2, "lr": 2}
    for text, key in (("a: 1\na: 2\n", "'a'"), ("{1: a, true: b}", "True")):
        with pytest.raises(Exception, match=f"key {key} is given twice"):
            load_yaml(text)
