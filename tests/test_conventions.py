"""The command line's conventions (issue 12): every flag has help, descriptions are written
for users, files get ordinary modes, default run names are plain, `--json` output is pure."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import pytest

import autobuild
from autobuild.cli import COMMANDS, build_parser, main
from autobuild.train.rundir import default_run_dir


def test_every_flag_has_help_and_every_command_a_description() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for action in parser._actions:
        assert action.help, action.option_strings or action.dest
    for name, command in sub.choices.items():
        module = importlib.import_module(f"autobuild.cli.{name}")
        assert command.description and command.description != module.__doc__, name
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_saved_files_get_the_mode_open_gives(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    model = autobuild.convert("cifar_resnet20", to="quadratic")
    out = autobuild.save(model, tmp_path / "m")  # a pathlib path is fine too
    for name in ("plan.yaml", "weights.safetensors"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_default_run_directory_names_are_plain() -> None:
    assert default_run_dir("timm:resnet18", "quadratic") == os.path.join(
        "runs", "timm_resnet18-quadratic")
    assert default_run_dir("cifar_resnet20", None) == os.path.join("runs",
                                                                   "cifar_resnet20-baseline")


def test_train_json_prints_only_json_on_stdout(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "cifar_resnet20", "--data", "synthetic:size=3x8x8,classes=4,"
                 "train=16,val=8", "--epochs", "2", "--out", str(tmp_path / "r"), "--json",
                 "--batch-size", "16", "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["epochs"] == 2  # the whole of stdout is one JSON value
    assert "epoch" in captured.err  # the per-epoch progress went to stderr


def test_one_site_is_singular(capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--sites", "conv1"]) == 0
    out = capsys.readouterr().out
    assert "1 site," in out and "1 sites" not in out
