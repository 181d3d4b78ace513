"""Search spaces: validation names the key; --set overrides; every shipped space loads."""

from __future__ import annotations

import glob
import os

import pytest

from autobuild.errors import AutobuildError
from autobuild.search.space import Constraint, load_space
from tests.search.conftest import tiny_space

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "search_spaces",
                                                               "*.yaml"))))
def test_shipped_spaces_are_valid(path) -> None:
    space = load_space(path)
    assert space.groups and space.objectives[0] == "top1"


def test_overrides_and_defaults() -> None:
    space = load_space(tiny_space(), ["budget.epochs=1", "n_trials=7", "sampler=random",
                                      "constraints=[macs <= 1.5 * baseline]"])
    assert space.budget.epochs == 1 and space.n_trials == 7 and space.sampler == "random"
    assert space.groups[0].choices[0] == "keep"
    c = space.parsed_constraints()[0]
    assert c.bound({"macs": 100}) == 150 and c.violation({"macs": 300}, {"macs": 100}) == 1.0
    assert load_space(tiny_space()).fingerprint() == load_space(
        tiny_space(), ["n_trials=99"]).fingerprint()  # run-time settings are not the space
    assert load_space(tiny_space()).fingerprint() != load_space(
        tiny_space(), ["budget.epochs=9"]).fingerprint()


def test_model_args_are_checked_and_a_space_without_them_keeps_its_fingerprint() -> None:
    """Studies made before spaces had ``model_args`` continue (their fingerprint was taken
    without the key); with arguments the space is another one."""
    assert load_space(tiny_space()).fingerprint() == "1e2a8d5c84cfc3ad"
    with_args = load_space(tiny_space(model_args={"drop_path_rate": 0.1}))
    assert with_args.model_args == {"drop_path_rate": 0.1}
    assert with_args.fingerprint() != load_space(tiny_space()).fingerprint()
    with pytest.raises(AutobuildError, match="model_args: drop_path_rate: must be less than 1"):
        load_space(tiny_space(model_args={"drop_path_rate": 2}))
    with pytest.raises(AutobuildError, match="model_args: 'depth': unknown; valid: "):
        load_space(tiny_space(), ["model_args.depth=3"])


@pytest.mark.parametrize("change,needle", [
    ({"objectives": ["top1", "speed"]}, "objectives: unknown objective 'speed'"),
    ({"budget": {"epochs": 0}}, "budget.epochs: must be greater than or equal to 1, got 0"),
    ({"groups": []}, "groups: must have at least 1 item"),
    ({"constraints": ["macs < 3"]}, "constraints: constraint 'macs < 3' must look like"),
    ({"seed": 10**23}, "^search space .*: seed: must be less than or equal to 4294901759"),
    # an infinite bound was Optuna's "NaN is not allowed" (exit 1) after the study was made
    ({"constraints": ["macs <= 1e309"]}, "constraints: constraint 'macs <= 1e309': the bound "
                                         "must be a finite number, at most 1e18"),
    ({"constraints": ["macs <= 1e999 * baseline"]}, "at most 1e6 . baseline"),
    # (the value once: ", got 'cmaes'" repeated what the message says)
    ({"sampler": "cmaes"}, "sampler: unknown sampler 'cmaes'; valid: default, nsga2, tpe, "
                           "random, bruteforce$"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"name": "a b"}, "name: must be 1 to 100 ASCII letters"),
    # a value the fixed text happens to quote is still shown
    ({"name": "-"}, "name: must be 1 to 100 ASCII letters.*, got '-'$"),
    ({"name": "étude"}, "name: must be 1 to 100 ASCII letters"),
    ({"groups": [{"sites": "x"}]}, "groups.0.choices: is required"),
    # a typo in a choice: refused when the space is read, naming the key (it was a bare
    # "unknown option" once the study had started)
    ({"groups": [{"sites": "x", "choices": ["quadratic:typ=ours"]}]},
     "groups.0.choices: choice 'quadratic:typ=ours': unknown option of quadratic 'typ' "
     ".did you mean type..; valid: .*type, volterra_max_params$"),
    ({"groups": [{"sites": "x", "choices": [{"family": "quadratic", "type": "t9"}]}]},
     "groups.0.choices: choice '{\"family\": \"quadratic\", \"type\": \"t9\"}': "
     "option type='t9' of quadratic is not valid"),
    # two groups of one name were one Optuna parameter with two sets of choices (exit 1,
    # a half-made study)
    ({"groups": [{"name": "a", "sites": "x", "choices": ["dirac"]},
                 {"name": "a", "sites": "y", "choices": ["quadratic"]}]},
     "groups: group 1's name 'a' is also group 0's; give each group its own name"),
    ({"groups": [{"name": "g1", "sites": "x", "choices": ["dirac"]},
                 {"sites": "y", "choices": ["quadratic"]}]},
     "groups: group 1's default name 'g1' is also group 0's"),
    ({"groups": [{"name": "site:x", "sites": "x", "choices": ["dirac"]}]},
     "groups: group 0's name 'site:x' starts with 'site:'"),
])
def test_bad_spaces_name_the_key(change, needle) -> None:
    with pytest.raises(AutobuildError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_space(tiny_space(**change))


@pytest.mark.parametrize("group,needle", [
    # one conversion listed twice (the sampler weighed it double); a group named ""
    ({"sites": "x", "choices": ["quadratic:ours", "quadratic:type=ours"]},
     "groups.0.choices: choices 'quadratic:ours' and 'quadratic:type=ours' are the same "
     "conversion; list each once"),
    ({"sites": "x", "choices": ["dirac"], "name": ""}, "groups.0.name: must not be empty"),
    ({"sites": "x", "choices": ["dirac"], "name": "  "}, "groups.0.name: must not be empty"),
    # a group with nothing to choose (keep is always added): a mistake, not a decision
    ({"sites": "x", "choices": []}, "groups.0.choices: nothing to choose besides keep"),
    ({"sites": "x", "choices": ["keep"]}, "groups.0.choices: nothing to choose besides keep"),
])
def test_a_new_study_refuses_what_an_older_one_continues_with(group, needle) -> None:
    from autobuild.search.checks import check_new_space

    space = load_space(tiny_space(groups=[group]))  # (a stored space still loads)
    with pytest.raises(AutobuildError, match=needle):
        check_new_space(space)


def test_a_float_key_takes_yaml_exponent_text() -> None:
    assert load_space(tiny_space(), ["pruning.margin=1e-1"]).pruning.margin == 0.1
    # YAML 1.1 reads a number without a dot as text: every file and --set takes it as the
    # number it spells (lr and weight decay are written so)
    space = load_space(tiny_space(), ["budget.lr=1e-3", "budget.weight_decay=5E-4"])
    assert (space.budget.lr, space.budget.weight_decay) == (0.001, 0.0005)
    # ... and what autobuild writes, it reads back as it was: a string that spells such a
    # number is quoted
    from autobuild.rewrite.plan import dump_yaml, load_yaml

    data = {"name": "1e3", "bn_eps": "1e-5", "lr": 1e-3, "epochs": 3}
    assert load_yaml(dump_yaml(data)) == data
    with pytest.raises(AutobuildError, match="pruning.margin: must be a valid number"):
        load_space(tiny_space(), ["pruning.margin=true"])


def test_bad_files_and_overrides(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(AutobuildError, match="is not valid YAML"):
        load_space(str(bad))
    bad.write_text("name: a\nbudget: {epochs: 1, epochs: 2}\n")
    with pytest.raises(AutobuildError, match="key 'epochs' is given twice \\(line 2\\)"):
        load_space(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(AutobuildError, match="must be a mapping"):
        load_space(str(bad))
    with pytest.raises(AutobuildError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
    with pytest.raises(AutobuildError, match="--set takes key.sub=value"):
        load_space(tiny_space(), ["budget.epochs"])
    # a number indexes a list ('groups' is not a mapping, it said)
    space = load_space(tiny_space(), ["groups.1.choices=[keep, dirac]", "groups.0.sites=layer2"])
    assert space.groups[1].choices == ["keep", "dirac"] and space.groups[0].sites == ["layer2"]
    with pytest.raises(AutobuildError, match="groups is a list of 2; index it with 0..1"):
        load_space(tiny_space(), ["groups.5.choices=[keep]"])
    with pytest.raises(AutobuildError, match="'name' is not a mapping or a list"):
        load_space(tiny_space(), ["name.x=1"])
    with pytest.raises(ValueError, match="must look like"):
        Constraint.parse("latency <= 3")
    with pytest.raises(ValueError, match="'macs <= 2..3 \\* baseline' must look like"):
        Constraint.parse("macs <= 2..3 * baseline")
