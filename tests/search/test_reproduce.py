"""A search trial is reproduced outside the search: `export` writes the initial weights it
trained from, and `train` (with --to, --placement or --plan) and `convert(seed=)` build
the same ones from the same seed."""

from __future__ import annotations

import shlex

import optuna
import pytest
import torch

import autobuild
from autobuild.cli import build_parser, main
from autobuild.cli.train import _build_model
from autobuild.train import TrainConfig
from tests.search.conftest import tiny_space

CONVS = [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_path_builds_a_trials_initial_weights(tmp_path) -> None:
    seed, shape = 3, ["--num-classes", "4", "--input-size", "3,8,8"]
    torch.manual_seed(seed)  # as the search does before it builds the baseline...
    analysis = autobuild.analyze("cifar_resnet20", num_classes=4, input_size=(3, 8, 8))
    torch.rand(5)  # (...and whatever else it draws before a trial: data, other trials)
    trial = analysis.build({s: "quadratic:ours" for s in CONVS}, seed=seed)
    autobuild.save(trial, str(tmp_path / "saved"))
    (tmp_path / "placement.yaml").write_text("".join(f"{s}: quadratic:ours\n" for s in CONVS))
    flags = {"--to": ["cifar_resnet20", "--to", "quadratic", "--sites", "layer1.*.conv*",
                      *shape],
             "--placement": ["cifar_resnet20", "--placement", str(tmp_path / "placement.yaml"),
                             *shape],
             "--plan": ["--plan", str(tmp_path / "saved" / "plan.yaml")]}
    cfg = TrainConfig(seed=seed)
    for name, argv in flags.items():
        args = build_parser().parse_args(["train", *argv, "--data", "synthetic"])
        assert _same(_build_model(args, cfg), trial), name
    assert _same(autobuild.build_plan(autobuild.plan_of(trial), seed=seed), trial)  # export
    assert _same(autobuild.convert("cifar_resnet20", "quadratic", sites="layer1.*.conv*",
                                   num_classes=4, input_size=(3, 8, 8), seed=seed), trial)
    # and another seed gives other weights (the comparison can fail)
    assert not _same(autobuild.build_plan(autobuild.plan_of(trial), seed=seed + 1), trial)


def test_a_trial_is_reproduced_by_export_and_train(in_tmp, capsys) -> None:
    """The initial weights of a trial are those `export` writes and `train` builds from the
    same seed (the conversions used to draw theirs after the baseline's in `train`, and
    `export` did not seed at all): the same per-epoch top-1 outside the search."""
    import csv

    import yaml

    space = tiny_space(groups=[{"sites": "layer1.*.conv*", "choices": ["quadratic:ours"]}],
                       n_trials=1, seed=3, pruning={"enabled": False},
                       seeding={"baseline": False, "all_converted": True, "revert_top_ri": 0})
    (in_tmp / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", "space.yaml", "--quiet"]) == 0
    (trial,) = optuna.load_study(study_name="tiny",
                                 storage="sqlite:///studies/tiny.db").get_trials()
    expected = trial.user_attrs["top1_per_epoch"]
    capsys.readouterr()
    assert main(["export", "--study", "tiny", "--trial", "0", "--out", "best"]) == 0
    # export prints the command that trains it as the search did (--seed included)
    printed = shlex.split(capsys.readouterr().out.splitlines()[-1])
    assert printed[:3] == ["autobuild", "train", "best"] and "--seed" in printed
    budget = ["--data", space["data"], "--epochs", "2", "--batch-size", "32", "--seed", "3",
              "--device", "cpu", "--no-progress"]
    runs = {"export": ["best", *budget], "plan": ["--plan", "best/plan.yaml", *budget],
            "flags": ["cifar_resnet20", "--to", "quadratic", "--sites", "layer1.*.conv*",
                      *budget],
            "printed": [*printed[2:], "--no-progress"]}
    for name, argv in runs.items():
        assert main(["train", *argv, "--out", f"run-{name}"]) == 0, name
        with open(in_tmp / f"run-{name}" / "metrics.csv") as f:
            top1 = [float(r["val_top1"]) for r in csv.DictReader(f)]
        assert top1 == pytest.approx(expected, abs=1e-3), name
    capsys.readouterr()
