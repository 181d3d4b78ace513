"""`save --force` killed (SIGKILL) at each step of the save (issue 12): the destination
holds the complete old model or the complete new one, loadable, and the next save leaves no
stray temporary file. The kill comes from io's fault-injection hook, in a subprocess that
runs the command line (`autobuild convert ... --out DIR --force`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import autobuild
from autobuild.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: The steps of a save (autobuild.io.save() and autobuild.files.staged_directory()), in order.
STEPS = ("weights", "plan", "staged", "exchanged")

_KILLED_SAVE = """
import os, signal, sys
from autobuild import files
from autobuild.cli import main

step = sys.argv[1]
def hook(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
files._fault_hook = hook
sys.exit(main(sys.argv[2:]))
"""


def _family(directory: Path) -> str:
    plan = autobuild.plan_of(autobuild.load(str(directory)))
    return sorted({choice.family for _, choice in plan.placement.items()})[0]


def _listing(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


@pytest.mark.parametrize("step", STEPS)
def test_save_killed_at_each_step_leaves_a_complete_model(step: str, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(dest)]) == 0
    old = {name: (dest / name).read_bytes() for name in os.listdir(dest)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, step, "convert",
                           "cifar_resnet20", "--to", "dirac", "--out", str(dest), "--force"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Before the exchange the destination is the old model, byte for byte; after it, the
    # new one. Either way it is complete and loads.
    if STEPS.index(step) < STEPS.index("exchanged"):
        assert {name: (dest / name).read_bytes() for name in os.listdir(dest)} == old
        assert _family(dest) == "quadratic"
    else:
        assert sorted(os.listdir(dest)) == ["plan.yaml", "weights.safetensors"]
        assert _family(dest) == "dirac"
    # The next save cleans what the killed one left beside the destination.
    assert main(["convert", "cifar_resnet20", "--to", "pde-global", "--out", str(dest),
                 "--force"]) == 0
    assert _listing(tmp_path) == ["model"]
    assert sorted(os.listdir(dest)) == ["plan.yaml", "weights.safetensors"]
    assert _family(dest) == "pde-global"


def test_convert_force_replaces_a_saved_model_as_a_whole(tmp_path: Path) -> None:
    """`convert --out SAVED --force` over an older saved model: none of its files stay
    beside the new model; over a training run it is refused (the run would be lost)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("plan.yaml", "weights.safetensors", "init.safetensors"):
        (run / name).write_text("old model\n")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(run),
                 "--force"]) == 0
    assert sorted(os.listdir(run)) == ["plan.yaml", "weights.safetensors"]
    assert _listing(tmp_path) == ["run"]
    (run / "checkpoint.pt").write_text("old run\n")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(run),
                 "--force"]) == 2
    assert (run / "checkpoint.pt").read_text() == "old run\n"
