"""The catalogue of bad inputs (issue 12): every command and the API refuse them cleanly.

Each CLI case asserts exit code 2, one line on stderr starting ``autobuild: error:`` that
names the culprit, no traceback, and that nothing on disk changed (the working directory,
where default outputs would go, and the shared fixtures: a saved model, a plan, a run).
Each API case asserts an :class:`AutobuildError` (never another exception) naming the culprit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import autobuild
from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.optim import param_groups
from autobuild.train import TrainConfig
from tests.search.conftest import tiny_space
from tests.train.conftest import write_imagefolder

SYNTH = "synthetic:size=3x8x8,classes=4,train=16,val=8"
FAST = ["--batch-size", "16", "--device", "cpu", "--no-progress", "--workers", "0"]


def _snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under ``roots``: mode and content hash."""
    state: dict[str, tuple[int, str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                digest = ""
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                state[path] = (st.st_mode, digest)
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the cases point at: a saved model, its plan, a finished run, placements and
    plans that are wrong in one way each, and image folders that are wrong in one way each."""
    root = tmp_path_factory.mktemp("world")
    model = str(root / "model")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", model]) == 0
    run = str(root / "run")
    assert main(["train", "cifar_resnet20", "--data", SYNTH, "--epochs", "1", "--out", run,
                 *FAST]) == 0
    plan = yaml.safe_load(Path(model, "plan.yaml").read_text())
    files = {
        "bad_yaml.yaml": "sites: [unclosed\n",
        "unknown_site.yaml": "nosuch.conv: quadratic\n",
        "unknown_family.yaml": "conv1: cubic\n",
        "list.yaml": "- conv1\n",
        "plan_extra_key.yaml": yaml.safe_dump({**plan, "colour": "red"}),
        "plan_no_model.yaml": yaml.safe_dump({k: v for k, v in plan.items() if k != "model"}),
        "plan_bad_classes.yaml": yaml.safe_dump({**plan, "num_classes": -3}),
        "plan_huge_classes.yaml": yaml.safe_dump({**plan, "num_classes": 10**30}),
        "empty.yaml": "",
        "space_bad.yaml": yaml.safe_dump({**tiny_space(), "bogus_key": 1}),
        "space_bad_epochs.yaml": yaml.safe_dump(tiny_space(budget={"epochs": 0})),
        "space_ok.yaml": yaml.safe_dump(tiny_space()),
        "exits.py": "import sys\nsys.exit(5)\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    # image folders, each wrong in one way
    write_imagefolder(root / "one_class", {"train": 2, "val": 2})
    for split in ("train", "val"):
        shutil.rmtree(root / "one_class" / split / "bright")
    truncated = write_imagefolder(root / "truncated", {"train": 2, "val": 2})
    png = truncated / "train" / "dark" / "000.png"
    png.write_bytes(png.read_bytes()[:-30])  # a valid header, the pixels cut short
    broken = write_imagefolder(root / "broken", {"train": 2, "val": 2})
    (broken / "train" / "dark" / "000.png").write_bytes(b"not a png")
    broken_val = write_imagefolder(root / "broken_val", {"train": 2, "val": 2})
    (broken_val / "val" / "dark" / "000.png").write_bytes(b"not a png")
    write_imagefolder(root / "tiny_images", {"train": 2, "val": 2}, size=2)
    (root / "a_file").write_text("not a directory\n")
    import sqlite3

    with sqlite3.connect(root / "other.db") as db:  # a user's database, not a study's
        db.execute("CREATE TABLE notes (text)")
    (root / "empty.db").write_bytes(b"")
    return {"root": str(root), "model": model, "run": run,
            "plan": os.path.join(model, "plan.yaml"), **{
                Path(n).stem: str(root / n) for n in files},
            "one_class": str(root / "one_class"), "truncated": str(truncated),
            "broken": str(broken), "broken_val": str(broken_val),
            "tiny_images": str(root / "tiny_images"),
            "a_file": str(root / "a_file")}


# (id, argv with {placeholders} from `world` and {out} = a fresh path, words the line must hold)
CLI_CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- conventions
    ("unknown-command", ["frobnicate"], ["invalid choice", "frobnicate"]),
    ("abbreviated-flag", ["train", "cifar_resnet20", "--data", SYNTH, "--epoch", "1"],
     ["--epoch"]),
    ("models-extra-arg", ["models", "--bogus"], ["--bogus"]),
    ("import-missing", ["--import", "no_such_module_xyz", "models"], ["no_such_module_xyz"]),
    # (it used to end the process with the module's exit status, saying nothing)
    ("import-exits", ["--import", "{exits}", "models"], ["exits.py", "called sys.exit(5)"]),
    # (these said "AttributeError: 'NoneType' object has no attribute 'loader'", "No module
    # named ..." and "ValueError: Empty module name")
    ("import-not-python", ["--import", "{empty}", "models"], ["empty.yaml: not a .py file"]),
    ("import-a-directory", ["--import", "{root}", "models"], ["is a directory; give a .py file"]),
    ("import-empty", ["--import", "", "models"], ["--import is empty"]),
    # (it said the file "is not writable")
    ("out-under-a-file", ["convert", "cifar_resnet20", "--to", "quadratic", "--out",
                          "{exits}/x"], ["exits.py' is a file, not a directory"]),
    # a flag that takes a value, given twice (argparse kept the last one silently)
    ("sites-twice", ["convert", "cifar_resnet20", "--to", "quadratic", "--sites", "layer1.*",
                     "--sites", "layer2.*"], ["--sites: given twice", "--sites A B"]),
    ("to-twice", ["convert", "cifar_resnet20", "--to", "quadratic", "--to=dirac"],
     ["--to: given twice"]),
    ("train-sync-bn-cpu", ["train", "cifar_resnet20", "--data", SYNTH, "--device", "cpu",
                           "--sync-bn", "--out", "{out}"], ["--sync-bn needs CUDA"]),
    ("milestones-twice", ["train", "cifar_resnet20", "--data", SYNTH, "--lr-milestones", "1",
                          "--lr-milestones", "2"], ["--lr-milestones: given twice"]),
    # ---- convert: flags and their bounds
    ("convert-out-empty", ["convert", "cifar_resnet20", "--to", "quadratic", "--out", ""],
     ["--out", "empty"]),
    ("convert-num-classes-0", ["convert", "cifar_resnet20", "--to", "quadratic",
                               "--num-classes", "0"], ["--num-classes", "0"]),
    ("convert-num-classes-neg", ["convert", "cifar_resnet20", "--to", "quadratic",
                                 "--num-classes", "-5"], ["--num-classes", "-5"]),
    # overflowed inside torch (exit 1, a traceback)
    ("convert-num-classes-huge", ["convert", "cifar_resnet20", "--to", "quadratic",
                                  "--num-classes", str(10**30)], ["--num-classes", "10000000"]),
    ("sites-num-classes-huge", ["sites", "cifar_resnet20", "--num-classes", str(2**63 - 1)],
     ["--num-classes", "10000000"]),
    ("plan-num-classes-huge", ["convert", "--plan", "{plan_huge_classes}"],
     ["'num_classes' must be at most 10,000,000"]),
    ("convert-num-classes-text", ["convert", "cifar_resnet20", "--to", "quadratic",
                                  "--num-classes", "x"], ["--num-classes", "'x'"]),
    ("convert-input-size-text", ["convert", "cifar_resnet20", "--to", "quadratic",
                                 "--input-size", "abc"], ["--input-size", "abc"]),
    ("convert-input-size-zero", ["convert", "cifar_resnet20", "--to", "quadratic",
                                 "--input-size", "3,0,32"], ["--input-size", "3,0,32"]),
    ("convert-input-size-2d", ["convert", "cifar_resnet20", "--to", "quadratic",
                               "--input-size", "32,32"], ["--input-size"]),
    ("convert-init", ["convert", "cifar_resnet20", "--to", "quadratic", "--init", "random"],
     ["--init", "random"]),
    ("convert-unknown-model", ["convert", "resnet5", "--to", "quadratic"], ["resnet5"]),
    ("convert-unknown-family", ["convert", "cifar_resnet20", "--to", "cubic"], ["cubic"]),
    ("convert-no-family", ["convert", "cifar_resnet20"], ["--to"]),
    ("convert-no-model", ["convert", "--to", "quadratic"], ["model"]),
    ("convert-option-no-equals", ["convert", "cifar_resnet20", "--to", "quadratic",
                                  "--option", "type"], ["--option", "name=value"]),
    ("convert-option-twice", ["convert", "cifar_resnet20", "--to", "quadratic", "--option",
                              "type=ours", "--option", "type=t2"], ["type", "twice"]),
    ("convert-option-unknown", ["convert", "cifar_resnet20", "--to", "quadratic",
                                "--option", "kind=ours"], ["kind"]),
    ("convert-option-choice", ["convert", "cifar_resnet20", "--to", "quadratic",
                               "--option", "type=t9"], ["type", "t9"]),
    ("option-K-float", ["convert", "cifar_resnet20", "--to", "pde-global", "--option",
                        "K=2.5"], ["K=2.5", "integer"]),
    ("option-K-huge", ["convert", "cifar_resnet20", "--to", "pde-global", "--option",
                       "K=1000000000"], ["K=1000000000"]),
    ("option-dx-huge", ["convert", "cifar_resnet20", "--to", "pde-global", "--option",
                        "dx=1000000"], ["dx=1000000", "[1, 64]"]),
    ("option-K-zero", ["convert", "cifar_resnet20", "--to", "pde-global", "--option", "K=0"],
     ["K=0"]),
    ("option-dt-zero", ["convert", "cifar_resnet20", "--to", "pde-global", "--option",
                        "dt=0"], ["dt"]),
    ("option-dt-nan", ["convert", "cifar_resnet20", "--to", "pde-global", "--option",
                       "dt=nan"], ["dt"]),
    ("option-folded-2", ["convert", "cifar_resnet20", "--to", "dirac", "--option",
                         "folded=2"], ["folded=2", "true or false"]),
    ("option-expansion-huge", ["convert", "cifar_resnet20", "--to", "multiplicative",
                               "--option", "expansion=1000000"], ["expansion"]),
    ("option-expansion-text", ["convert", "cifar_resnet20", "--to", "multiplicative",
                               "--option", "expansion=wide"], ["expansion=wide"]),
    ("convert-sites-unknown", ["convert", "cifar_resnet20", "--to", "quadratic", "--sites",
                               "layer9.*"], ["layer9.*"]),
    ("convert-sites-with-placement", ["convert", "cifar_resnet20", "--sites", "conv1",
                                      "--placement", "{unknown_site}"], ["--placement"]),
    ("convert-out-taken", ["convert", "cifar_resnet20", "--to", "dirac", "--out", "{model}"],
     ["--force"]),
    ("convert-out-is-file", ["convert", "cifar_resnet20", "--to", "dirac", "--out",
                             "{a_file}", "--force"], ["a_file"]),
    ("convert-weights-missing", ["convert", "cifar_resnet20", "--to", "quadratic",
                                 "--weights", "{root}/nope.safetensors"], ["nope"]),
    ("convert-weights-not-tensors", ["convert", "cifar_resnet20", "--to", "quadratic",
                                     "--weights", "{a_file}"],
     ["a_file", "not a readable file of tensors", "never unpickles"]),
    # a mistyped run directory was an unknown model, with every registered name listed
    ("convert-a-missing-run", ["convert", "{root}/no-such-run"],
     ["no-such-run': no such saved model directory"]),
    # (it said "... into cifar_resnet20: 101" and "...: pop from empty list")
    ("convert-weights-a-text-file", ["convert", "cifar_resnet20", "--to", "quadratic",
                                     "--weights", "{plan}"],
     ["plan.yaml", "not a readable file of tensors", "truncated, or another format"]),
    # ---- plans and placements
    ("plan-with-num-classes", ["convert", "--plan", "{plan}", "--num-classes", "10"],
     ["--num-classes", "--plan"]),
    ("plan-with-input-size", ["convert", "--plan", "{plan}", "--input-size", "3,32,32"],
     ["--input-size", "--plan"]),
    ("plan-with-init", ["convert", "--plan", "{plan}", "--init", "preserve"],
     ["--init", "--plan"]),
    ("plan-with-to", ["convert", "--plan", "{plan}", "--to", "dirac"], ["--to"]),
    ("plan-missing", ["convert", "--plan", "{root}/nope.yaml"], ["nope.yaml"]),
    ("plan-extra-key", ["convert", "--plan", "{plan_extra_key}"], ["colour"]),
    ("plan-no-model", ["convert", "--plan", "{plan_no_model}"], ["model"]),
    ("plan-bad-classes", ["convert", "--plan", "{plan_bad_classes}"], ["num_classes"]),
    ("plan-bad-yaml", ["convert", "--plan", "{bad_yaml}"], ["bad_yaml"]),
    ("placement-bad-yaml", ["convert", "cifar_resnet20", "--placement", "{bad_yaml}"],
     ["bad_yaml"]),
    ("placement-unknown-site", ["convert", "cifar_resnet20", "--placement",
                                "{unknown_site}"], ["nosuch.conv"]),
    ("placement-unknown-family", ["convert", "cifar_resnet20", "--placement",
                                  "{unknown_family}"], ["cubic"]),
    ("placement-list", ["convert", "cifar_resnet20", "--placement", "{list}"], ["list"]),
    ("placement-empty-path", ["convert", "cifar_resnet20", "--placement", ""],
     ["--placement"]),
    # ---- sites / inspect / fold / symmetry
    ("sites-unknown-model", ["sites", "resnet5"], ["resnet5"]),
    ("sites-bad-option", ["sites", "cifar_resnet20", "--to", "pde-global", "--option",
                          "K=-1"], ["K=-1"]),
    ("inspect-missing", ["inspect", "{root}/nope"], ["nope"]),
    ("inspect-not-a-model", ["inspect", "{root}"], ["plan.yaml"]),
    ("fold-out-taken", ["fold", "{model}", "--out", "{run}"], ["--force"]),
    ("fold-missing", ["fold", "{root}/nope", "--out", "{out}"], ["nope"]),
    ("symmetry-missing", ["symmetry", "{root}/nope"], ["nope"]),
    # ---- train: the recipe's bounds
    ("train-clip-grad-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--clip-grad", "-1"],
     ["--clip-grad", "-1"]),
    ("train-clip-grad-text", ["train", "cifar_resnet20", "--data", SYNTH, "--clip-grad",
                              "big"], ["--clip-grad", "big"]),
    ("train-weight-decay-neg", ["train", "cifar_resnet20", "--data", SYNTH,
                                "--weight-decay", "-0.1"], ["--weight-decay", "-0.1"]),
    ("train-lr-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--lr", "-1"],
     ["--lr", "-1"]),
    ("train-lr-nan", ["train", "cifar_resnet20", "--data", SYNTH, "--lr", "nan"],
     ["--lr", "'nan'", "must be a finite number"]),
    # (a float32 overflow inside torch's SGD: exit 1, the run left "failed")
    ("train-lr-huge", ["train", "cifar_resnet20", "--data", SYNTH, "--lr", "1e308", "--out",
                       "{out}"], ["--lr", "must be less than or equal to 1000", "1e308"]),
    ("train-weight-decay-huge", ["train", "cifar_resnet20", "--data", SYNTH, "--weight-decay",
                                 "1e308", "--out", "{out}"],
     ["--weight-decay", "must be less than or equal to 1000"]),
    ("train-momentum-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--momentum", "-1"],
     ["--momentum", "-1"]),
    ("train-workers-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--workers", "-1"],
     ["--workers", "-1"]),
    ("train-log-interval-0", ["train", "cifar_resnet20", "--data", SYNTH,
                              "--log-interval", "0"], ["--log-interval", "0"]),
    ("train-epochs-0", ["train", "cifar_resnet20", "--data", SYNTH, "--epochs", "0"],
     ["--epochs", "0"]),
    ("train-epochs-float", ["train", "cifar_resnet20", "--data", SYNTH, "--epochs", "2.5"],
     ["--epochs", "2.5"]),
    ("train-batch-size-0", ["train", "cifar_resnet20", "--data", SYNTH, "--batch-size", "0"],
     ["--batch-size", "0"]),
    ("train-optimizer", ["train", "cifar_resnet20", "--data", SYNTH, "--optimizer", "adam"],
     ["--optimizer", "adam"]),
    ("train-lr-gamma", ["train", "cifar_resnet20", "--data", SYNTH, "--lr-gamma", "2"],
     ["--lr-gamma", "2"]),
    ("train-label-smoothing", ["train", "cifar_resnet20", "--data", SYNTH,
                               "--label-smoothing", "1"], ["--label-smoothing", "1"]),
    ("train-cutout-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--cutout", "-1"],
     ["--cutout", "-1"]),
    ("train-cutout-over-the-image", ["train", "cifar_resnet20", "--data", SYNTH, "--cutout",
                                     "1000"], ["--cutout", "1000", "at most"]),
    ("train-drop-path-1", ["train", "cifar_resnet20", "--data", SYNTH, "--drop-path", "1"],
     ["--drop-path", "1"]),
    ("train-drop-path-no-cells", ["train", "cifar_resnet20", "--data", SYNTH, "--drop-path",
                                  "0.2"], ["drop_path", "no drop path"]),
    ("train-detection-cutout", ["train", "ssdlite320_mobilenet_v3_large", "--data",
                                "synthetic-detection", "--cutout", "16"],
     ["cutout", "classifiers"]),
    ("train-detection-drop-path", ["train", "ssdlite320_mobilenet_v3_large", "--data",
                                   "synthetic-detection", "--drop-path", "0.2"],
     ["--drop-path", "0.2", "DARTS cells"]),
    ("train-aux-weight", ["train", "cifar_resnet20", "--data", SYNTH, "--aux-weight", "11"],
     ["--aux-weight", "11"]),
    ("train-aux-weight-no-tower", ["train", "cifar_resnet20", "--data", SYNTH, "--aux-weight",
                                   "0.4"], ["aux_weight", "no auxiliary tower"]),
    ("train-tower-64px", ["train", "cifar_darts_v2_aux", "--data",
                          "synthetic:size=3x64x64,classes=10,train=8,val=4"], ["8x8 features"]),
    ("train-ema", ["train", "cifar_resnet20", "--data", SYNTH, "--ema", "1.5"],
     ["--ema", "1.5"]),
    ("train-seed-neg", ["train", "cifar_resnet20", "--data", SYNTH, "--seed", "-1"],
     ["--seed", "-1"]),
    ("train-device", ["train", "cifar_resnet20", "--data", SYNTH, "--device", "tpu"],
     ["--device", "tpu"]),
    # its event files in the run made a later --force refuse the run as holding foreign files
    ("train-tensorboard-in-the-run", ["train", "cifar_resnet20", "--data", SYNTH, "--out",
                                      "{out}", "--tensorboard", "{out}/tb", *FAST],
     ["--tensorboard", "is inside the run directory", "beside the run"]),
    # its event files landed in another run, whose --force then refused them as foreign
    ("train-tensorboard-in-another-run", ["train", "cifar_resnet20", "--data", SYNTH, "--out",
                                          "{out}", "--tensorboard", "{run}", *FAST],
     ["--tensorboard", "is a training run", "a directory of its own"]),
    ("train-tensorboard-inside-a-model", ["train", "cifar_resnet20", "--data", SYNTH, "--out",
                                          "{out}", "--tensorboard", "{model}/tb", *FAST],
     ["--tensorboard", "is inside a saved model"]),
    ("train-tensorboard-every", ["train", "cifar_resnet20", "--data", SYNTH,
                                 "--tensorboard-every", "0"], ["--tensorboard-every", "0"]),
    ("train-milestone-0", ["train", "cifar_resnet20", "--data", SYNTH, "--lr-milestones",
                           "0"], ["--lr-milestones", "0"]),
    ("train-amp-dtype-without-amp", ["train", "cifar_resnet20", "--data", SYNTH,
                                     "--amp-dtype", "fp16", "--out", "{out}"],
     ["--amp-dtype", "turn on amp (--amp)"]),
    # a flag the rest of the recipe makes idle is refused even at its default value
    ("train-amp-dtype-bf16-without-amp", ["train", "cifar_resnet20", "--data", SYNTH,
                                          "--amp-dtype", "bf16", "--out", "{out}"],
     ["--amp-dtype) bf16", "turn on amp (--amp)"]),
    ("train-lr-gamma-with-cosine", ["train", "cifar_resnet20", "--data", SYNTH,
                                    "--lr-gamma", "0.5", "--out", "{out}"],
     ["--lr-gamma) 0.5", "lr_schedule (--lr-schedule) multistep"]),
    # outputs inside another output: foreign there, so its --force refused or deleted them
    ("convert-out-inside-a-run", ["convert", "cifar_resnet20", "--to", "dirac", "--out",
                                  "{run}/m"], ["/m' would be inside a training run"]),
    ("analyze-out-inside-a-model", ["analyze", "{run}", "--out", "{model}/a"],
     ["/a' would be inside a saved model"]),
    ("search-database-inside-a-run", ["search", "{space_ok}", "--storage",
                                      "sqlite:///{run}/s.db"],
     ["s.db' would be inside a training run"]),
    # capped at a quarter of the run while train.yaml recorded 100
    ("train-warmup-over-the-run", ["train", "cifar_resnet20", "--data", SYNTH, "--epochs",
                                   "1", "--warmup-epochs", "100", "--out", "{out}"],
     ["--warmup-epochs) 100: the warm-up is at most a quarter of the run (0.25"]),
    # recorded in train.yaml, never used: AdamW has no momentum (the record claimed a recipe
    # that was not run)
    ("train-momentum-with-adamw", ["train", "cifar_resnet20", "--data", SYNTH, "--optimizer",
                                   "adamw", "--momentum", "0.5", "--out", "{out}"],
     ["--momentum) 0.5: it is SGD's momentum, and the optimizer is adamw"]),
    ("train-nesterov-with-adamw", ["train", "cifar_resnet20", "--data", SYNTH, "--optimizer",
                                   "adamw", "--no-nesterov", "--out", "{out}"],
     ["nesterov (--no-nesterov) False: it is SGD's, and the optimizer is adamw; set "
      "optimizer (--optimizer) sgd"]),
    ("train-tensorboard-every-default-without-tensorboard", [
        "train", "cifar_resnet20", "--data", SYNTH, "--tensorboard-every", "5", "--out",
        "{out}"], ["--tensorboard-every) 5", "give tensorboard (--tensorboard) DIR"]),
    ("search-lr-gamma-with-cosine", ["search", "{space_ok}", "--set", "budget.lr_gamma=0.5",
                                     "--storage", "sqlite:///{out}.db"],
     ["search space '{space_ok}': budget.lr_gamma 0.5", "; set budget.lr_schedule multistep"]),
    ("train-detection-label-smoothing", ["train", "ssdlite320_mobilenet_v3_large", "--data",
                                         "synthetic-detection", "--label-smoothing", "0.1",
                                         "--out", "{out}"],
     ["--label-smoothing", "0.1", "classifiers"]),
    ("search-milestones-with-cosine", ["search", "{space_ok}", "--set",
                                       "budget.lr_milestones=[1]", "--storage",
                                       "sqlite:///{out}.db"],
     ["search space '{space_ok}': budget.lr_milestones [1]", "multistep schedule only"]),
    ("sites-of-a-saved-model", ["sites", "{model}"], ["is a directory", "autobuild inspect"]),
    ("convert-placement-a-directory", ["convert", "cifar_resnet20", "--placement", "{root}"],
     ["placement file", "is a directory"]),
    # (its placement was applied to the other model, its init dropped, silently)
    ("convert-placement-a-plan-of-another-model", ["convert", "cifar_resnet32", "--placement",
                                                   "{model}/plan.yaml"],
     ["plan.yaml: a plan of cifar_resnet20, not cifar_resnet32"]),
    # it tried to allocate 240 GB before the model refused the images
    ("evaluate-image-size-huge", ["evaluate", "{run}", "--image-size", "100000"],
     ["--image-size", "must be less than or equal to 4096"]),
    ("train-image-size-synthetic", ["train", "cifar_resnet20", "--data", SYNTH, "--image-size",
                                    "64", "--out", "{out}"],
     ["--image-size 64", "only imagefolder data is resized", "synthetic:size=CxHxW"]),
    ("search-cutout-larger-than-images", ["search", "{space_ok}", "--set", "budget.cutout=100",
                                          "--storage", "sqlite:///{out}.db"],
     ["search space '{space_ok}': budget.cutout 100", "larger than the"]),
    ("train-tensorboard-every-without-tensorboard", ["train", "cifar_resnet20", "--data", SYNTH,
                                                     "--tensorboard-every", "2", "--out",
                                                     "{out}"],
     ["--tensorboard-every", "give tensorboard (--tensorboard) DIR"]),
    ("search-tensorboard-every-without-tensorboard", ["search", "{space_ok}", "--set",
                                                      "budget.tensorboard_every=2", "--storage",
                                                      "sqlite:///{out}.db"],
     ["search space '{space_ok}': budget.tensorboard_every 2",
      "; give budget.tensorboard DIR"]),
    ("train-data-dir-not-cifar", ["train", "cifar_resnet20", "--data", SYNTH, "--data-dir",
                                  "{root}/dl", "--out", "{out}"],
     ["--data-dir", "'synthetic", "does not read it"]),
    ("search-image-size-synthetic", ["search", "{space_ok}", "--set", "budget.image_size=64",
                                     "--storage", "sqlite:///{out}.db"],
     ["search space '{space_ok}': budget.image_size 64", "only imagefolder data is resized"]),
    ("train-milestone-repeated", ["train", "cifar_resnet20", "--data", SYNTH, "--lr-schedule",
                                  "multistep", "--lr-milestones", "5", "5", "--epochs", "10",
                                  "--out", "{out}"],
     ["--lr-milestones", "epoch 5 is given twice"]),
    ("train-milestones-with-cosine", ["train", "cifar_resnet20", "--data", SYNTH,
                                      "--lr-milestones", "1", "--out", "{out}"],
     ["--lr-milestones", "multistep schedule only"]),
    ("train-milestones-beyond-the-run", ["train", "cifar_resnet20", "--data", SYNTH,
                                         "--lr-schedule", "multistep", "--epochs", "2",
                                         "--lr-milestones", "5", "--out", "{out}"],
     ["--lr-milestones", "[5]", "beyond the run's 2 epochs"]),
    ("train-train-subset-0", ["train", "cifar_resnet20", "--data", SYNTH, "--train-subset",
                              "0"], ["--train-subset", "0"]),
    ("train-out-empty", ["train", "cifar_resnet20", "--data", SYNTH, "--out", ""],
     ["--out"]),
    # ---- train: data and directories
    ("train-no-data", ["train", "cifar_resnet20", "--out", "{out}"], ["--data"]),
    ("train-bad-data-spec", ["train", "cifar_resnet20", "--data", "bogus", "--out", "{out}"],
     ["bogus"]),
    ("train-imagefolder-missing", ["train", "cifar_resnet20", "--data",
                                   "imagefolder:{root}/nope", "--out", "{out}", *FAST],
     ["nope"]),
    ("train-one-class-folder", ["train", "cifar_resnet20", "--data",
                                "imagefolder:{one_class}", "--out", "{out}", *FAST],
     ["one_class", "class"]),
    ("train-truncated-image", ["train", "cifar_resnet20", "--data",
                               "imagefolder:{truncated}", "--epochs", "1", "--out", "{out}",
                               *FAST], ["000.png"]),
    # in a data-loader worker, the error arrives as the worker's traceback
    ("train-truncated-image-worker", ["train", "cifar_resnet20", "--data",
                                      "imagefolder:{truncated}", "--epochs", "1", "--out",
                                      "{out}", *FAST, "--workers", "1"], ["000.png"]),
    # (only train/'s headers were read: the run started and left its directory)
    ("train-unreadable-val-image", ["train", "cifar_resnet20", "--data",
                                    "imagefolder:{broken_val}", "--out", "{out}", *FAST],
     ["val/dark/000.png", "cannot read"]),
    ("train-unreadable-image", ["train", "cifar_resnet20", "--data", "imagefolder:{broken}",
                                "--out", "{out}", *FAST], ["000.png", "cannot read"]),
    ("train-num-classes-mismatch", ["train", "cifar_resnet20", "--data", SYNTH,
                                    "--num-classes", "10", "--out", "{out}"],
     ["--num-classes", "10"]),
    ("train-run-taken", ["train", "cifar_resnet20", "--data", SYNTH, "--out", "{run}", *FAST],
     ["--resume", "--force"]),
    ("train-out-not-writable", ["train", "cifar_resnet20", "--data", SYNTH, "--out",
                                "{a_file}/run", *FAST], ["a_file"]),
    # 2x2 images trained at their own size: a diverged run left behind, not a refusal
    ("train-images-too-small", ["train", "cifar_resnet20", "--data", "imagefolder:{tiny_images}",
                                "--out", "{out}", *FAST],
     ["its images are 2 px a side, under the 8 px", "--image-size"]),
    ("train-resume-missing", ["train", "--resume", "{root}/nope"], ["nope"]),
    # the checkpoint holds SGD's state: a vague "does not match: 'step'" after loading
    ("train-resume-other-optimizer", ["train", "--resume", "{run}", "--epochs", "3",
                                      "--optimizer", "adamw"],
     ["--optimizer", "the run trains with sgd", "--out NEW"]),
    # whole-number floats were read as integers ("--epochs 1.0" trained one epoch)
    *[(f"integer-flag-{i}", argv, [flag, "must be an integer, got"]) for i, (argv, flag) in
      enumerate([(["train", "cifar_resnet20", "--epochs", "1.0"], "--epochs"),
                 (["train", "cifar_resnet20", "--batch-size", "16.0"], "--batch-size"),
                 (["evaluate", "{run}", "--batch-size", "8.0"], "--batch-size"),
                 (["symmetry", "{model}", "--seed", "1.0"], "--seed"),
                 (["dashboard", "--port", "8080.0"], "--port"),
                 (["train", "cifar_resnet20", "--lr-schedule", "multistep", "--lr-milestones",
                   "1.0"], "--lr-milestones")])],
    # a resumed run took milestones it would never reach (a new run refused them)
    ("train-resume-milestones-beyond", ["train", "--resume", "{run}", "--epochs", "3",
                                        "--lr-schedule", "multistep", "--lr-milestones", "10"],
     ["--lr-milestones [10]: beyond the run's 3 epochs"]),
    ("train-resume-with-to", ["train", "--resume", "{run}", "--to", "quadratic"],
     ["--resume", "--to"]),
    ("train-resume-fewer-epochs", ["train", "--resume", "{run}", "--epochs", "1"],
     ["--epochs", "already trained 1 epoch"]),
    ("train-resume-force", ["train", "--resume", "{run}", "--force"], ["--force"]),
    # ---- evaluate / importance / analyze
    ("evaluate-missing", ["evaluate", "{root}/nope", "--data", SYNTH], ["nope"]),
    ("evaluate-batch-size-0", ["evaluate", "{run}", "--batch-size", "0"],
     ["--batch-size", "0"]),
    ("evaluate-bad-data", ["evaluate", "{run}", "--data", "bogus"], ["bogus"]),
    ("evaluate-download-synthetic", ["evaluate", "{run}", "--download"],
     ["--download fetches CIFAR", "is not downloaded"]),
    ("importance-missing", ["importance", "{root}/nope", "--data", SYNTH], ["nope"]),
    ("analyze-out-empty", ["analyze", "{run}", "--out", ""], ["--out"]),
    ("analyze-batches-0", ["analyze", "{run}", "--out", "{out}", "--batches", "0"],
     ["--batches", "0"]),
    ("analyze-missing", ["analyze", "{root}/nope", "--out", "{out}"], ["nope"]),
    # ---- search and its tools
    ("search-space-missing", ["search", "{root}/nope.yaml", "--n-trials", "1"],
     ["nope.yaml"]),
    ("search-space-unknown-key", ["search", "{space_bad}", "--n-trials", "1"],
     ["bogus_key"]),
    ("search-budget-epochs-0", ["search", "{space_bad_epochs}"], ["budget.epochs"]),
    ("search-budget-subset-too-big", ["search", "{space_ok}", "--set",
                                      "budget.train_subset=99999"],
     ["search space '{space_ok}': budget.train_subset must be in 1.."]),
    ("search-n-trials-0", ["search", "{space_bad}", "--n-trials", "0"], ["--n-trials", "0"]),
    ("search-bad-study-name", ["search", "{space_bad}", "--study", "../escape"],
     ["--study"]),
    ("search-heartbeat-neg", ["search", "{space_bad}", "--heartbeat", "-1"],
     ["--heartbeat", "-1"]),
    ("worker-sqlite", ["worker", "--storage", "sqlite:///{root}/s.db", "--study", "s"],
     ["SQLite"]),
    ("status-missing-study", ["status", "--study", "nope_study", "--storage",
                              "sqlite:///{root}/nope.db"], ["nope"]),
    ("report-missing-study", ["report", "--study", "nope_study", "--storage",
                              "sqlite:///{root}/nope.db"], ["nope"]),
    ("export-trial-neg", ["export", "--study", "s", "--trial", "-1", "--out", "{out}"],
     ["--trial", "-1"]),
    ("export-missing-study", ["export", "--study", "nope_study", "--storage",
                              "sqlite:///{root}/nope.db", "--trial", "0", "--out", "{out}"],
     ["nope"]),
    ("status-not-a-study-db", ["status", "--storage", "sqlite:///{root}/other.db"],
     ["other.db", "not a study database", "other tables (notes)"]),
    ("status-empty-db", ["status", "--storage", "sqlite:///{root}/empty.db"],
     ["empty.db", "not a study database but an empty file"]),
    ("report-not-a-study-db", ["report", "--study", "s", "--storage",
                               "sqlite:///{root}/other.db", "--out", "{out}"],
     ["not a study database"]),
    ("export-not-a-study-db", ["export", "--study", "s", "--storage",
                               "sqlite:///{root}/other.db", "--trial", "0", "--out", "{out}"],
     ["not a study database"]),
    ("search-into-a-user-db", ["search", "{space_ok}", "--storage",
                               "sqlite:///{root}/other.db"], ["not a study database"]),
    # ---- outputs checked before the work that would fill them
    ("train-tensorboard-file", ["train", "cifar_resnet20", "--data", SYNTH, "--out", "{out}",
                                "--tensorboard", "{a_file}", *FAST],
     ["--tensorboard", "exists and is not a directory"]),
    ("train-resume-tensorboard-file", ["train", "--resume", "{run}", "--epochs", "2",
                                       "--tensorboard", "{a_file}", *FAST],
     ["--tensorboard", "exists and is not a directory"]),
    ("train-resume-two-runs", ["train", "cifar_resnet20", "--resume", "--out", "{run}"],
     ["continues one run", "cifar_resnet20"]),
    ("analyze-compare-missing", ["analyze", "{run}", "--out", "{out}", "--compare",
                                 "{root}/nope"], ["--compare", "nope"]),
    ("analyze-compare-not-a-model", ["analyze", "{run}", "--out", "{out}", "--compare",
                                     "{root}"], ["--compare"]),
    ("analyze-out-a-file", ["analyze", "{run}", "--out", "{a_file}", "--force"],
     ["a_file", "not a directory", "--out"]),
    ("train-out-a-file", ["train", "cifar_resnet20", "--data", SYNTH, "--out", "{a_file}",
                          *FAST], ["a_file", "not a directory", "--out"]),
    ("convert-input-size-wide-digits", ["convert", "cifar_resnet20", "--input-size",
                                        "\uff13,32,32"], ["--input-size", "C,H,W"]),
    ("train-tensorboard-empty", ["train", "cifar_resnet20", "--data", SYNTH,
                                 "--tensorboard", ""], ["--tensorboard", "must not be empty"]),
    ("search-study-name-words", ["search", "{space_bad}", "--study", "a b"],
     ["--study", "letters, digits", "'a b'"]),
    ("analyze-force-over-the-run", ["analyze", "{run}", "--out", "{run}", "--force"],
     ["run' is '", "replacing it whole (--force) would delete that"]),
    ("fold-force-over-the-run", ["fold", "{run}", "--out", "{run}", "--force"],
     ["run', which this command must keep", "would delete that"]),
    ("convert-force-over-its-plan", ["convert", "--plan", "{run}/plan.yaml", "--out", "{run}",
                                     "--force"], ["holds", "plan.yaml', which this command "
                                                  "must keep", "would delete that"]),
    ("analyze-force-over-its-parent", ["analyze", "{run}", "--out", "{root}", "--force"],
     ["holds", "would delete that"]),
    ("analyze-force-over-the-cwd", ["analyze", "{run}", "--out", ".", "--force"],
     ["is the current directory"]),
    ("convert-over-the-cwd", ["convert", "cifar_resnet20", "--to", "quadratic", "--out", "."],
     ["is the current directory"]),
    ("importance-csv-exists", ["importance", "{model}", "--data", SYNTH, "--csv", "{a_file}"],
     ["--csv", "exists", "--force"]),
    ("importance-csv-a-directory", ["importance", "{model}", "--data", SYNTH, "--csv",
                                    "{root}"], ["--csv", "is a directory"]),
    # --force wrote the table over the weights (or the record) of the run being read
    ("importance-csv-over-its-run", ["importance", "{run}", "--csv",
                                     "{run}/weights.safetensors", "--force"],
     ["is in RUN", "which this command reads"]),
    ("importance-csv-new-in-its-run", ["importance", "{run}", "--csv", "{run}/ri.csv"],
     ["is in RUN", "give a path outside it"]),
    ("importance-csv-over-another-model", ["importance", "{run}", "--csv",
                                           "{model}/weights.safetensors", "--force"],
     ["is a file autobuild wrote (weights.safetensors), not a CSV"]),
    # (--force wrote the table over another run's metrics.csv; a new file in a model made
    # the model's --force refuse it as foreign)
    ("importance-csv-over-another-runs-metrics", ["importance", "{model}", "--data", SYNTH,
                                                  "--csv", "{run}/metrics.csv", "--force"],
     ["metrics.csv' is in a training run", "give a path outside it"]),
    ("importance-csv-new-in-a-model", ["importance", "{run}", "--csv", "{model}/ri.csv"],
     ["ri.csv' is in a saved model"]),
    # ---- sizes that would allocate or run for ever
    ("symmetry-seed-huge", ["symmetry", "{model}", "--seed", "99999999999999999999"],
     ["--seed", "4294901759"]),
    ("evaluate-synthetic-huge-images", ["evaluate", "{run}", "--data",
                                        "synthetic:size=3x100000x100000"], ["4096 pixels"]),
    ("evaluate-synthetic-huge-val", ["evaluate", "{run}", "--data", "synthetic:val=99999999999"],
     ["1,000,000 train or val images"]),
    ("train-detection-seed-neg", ["train", "ssdlite320_mobilenet_v3_large", "--data",
                                  "synthetic-detection:seed=-1", "--out", "{out}"],
     ["seed >= 0"]),
    ("train-detection-huge-images", ["train", "ssdlite320_mobilenet_v3_large", "--data",
                                     "synthetic-detection:size=100000", "--out", "{out}"],
     ["size in 16..4096"]),
    # the device is checked before the run directory is made (an empty one was left)
    ("train-device-absent-out", ["train", "cifar_resnet20", "--data", SYNTH, "--device",
                                 "cuda:99", "--out", "{out}"], ["--device cuda:99"]),
    ("train-device-absent", ["train", "cifar_resnet20", "--to", "dirac", "--data", SYNTH,
                             "--device", "cuda:99"], ["--device cuda:99"]),
    ("dashboard-port-0", ["dashboard", "--port", "0"], ["--port", "0"]),
    ("dashboard-port-huge", ["dashboard", "--port", "70000"], ["--port", "70000"]),
]


@pytest.mark.parametrize("argv,words", [pytest.param(a, w, id=i) for i, a, w in CLI_CASES])
def test_cli_refuses_cleanly(argv: list[str], words: list[str], world: dict[str, str],
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, studies/, reports/) would land here
    values = {**world, "out": str(tmp_path / "out")}
    argv = [a.format(**values) for a in argv]
    words = [w.format(**values) for w in words]
    before = _snapshot(tmp_path, Path(world["root"]))
    code = main(argv)
    if any("truncated" in a for a in argv):
        # Found while training (images are decoded as they are read): the run directory
        # records the failure, everything else is untouched.
        record = yaml.safe_load((tmp_path / "out" / "train.yaml").read_text())
        assert record["status"] == "failed" and "000.png" in record["reason"]
        assert record["reason"].startswith("AutobuildError: cannot"), record["reason"]
        shutil.rmtree(tmp_path / "out")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autobuild: error: "), err
    assert "autobuild: error: autobuild" not in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(tmp_path, Path(world["root"])) == before


def _quadratic() -> Any:
    return autobuild.variants.get_variant("quadratic")


class _Impostor(autobuild.Variant):
    name = "quadratic"


class _NoSuchPrimary(autobuild.Variant):
    name, primary_option = "no-such-primary-test", "nope"


def _converted() -> Any:
    return autobuild.convert("cifar_resnet20", "quadratic", sites="layer1.0.conv1")


def _train_api(data: Any, config: Any) -> Any:
    from autobuild.train import train

    return train(torch.nn.Linear(2, 2), data, config)


API_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("to-int", lambda: autobuild.convert("cifar_resnet20", to=3), "3"),
    ("count-size-negative", lambda: autobuild.count(torch.nn.Conv2d(3, 3, 1), (3, -1, 32)),
     "(3, -1, 32)"),
    ("count-a-name", lambda: autobuild.count("resnet18", (3, 32, 32)), "analyze('resnet18')"),
    ("count-size-text", lambda: autobuild.count(torch.nn.Conv2d(3, 3, 1), "3,32,32"),
     "input_size"),
    ("train-data-int", lambda: _train_api(5, None), "data must be"),
    ("train-data-none", lambda: _train_api(None, None), "data must be"),
    ("train-config-dict", lambda: _train_api(SYNTH, {"epochs": 1}), "TrainConfig"),
    ("sites-int", lambda: autobuild.convert("cifar_resnet20", to="quadratic", sites=5),
     "sites"),
    ("sites-empty", lambda: autobuild.convert("cifar_resnet20", to="dirac", sites=[]),
     "sites"),
    ("options-list", lambda: autobuild.convert("cifar_resnet20", to="quadratic",
                                               options=["type=ours"]), "options"),
    ("input-size-text", lambda: autobuild.analyze("cifar_resnet20", input_size="abc"),
     "input_size"),
    ("num-classes-text", lambda: autobuild.analyze("cifar_resnet20", num_classes="x"),
     "num_classes"),
    ("num-classes-bool", lambda: autobuild.analyze("cifar_resnet20", num_classes=True),
     "num_classes"),
    ("num-classes-0", lambda: autobuild.analyze("cifar_resnet20", num_classes=0),
     "num_classes"),
    ("K-float", lambda: autobuild.convert("cifar_resnet20", to="pde-global",
                                          options={"K": 2.5}), "K=2.5"),
    ("K-huge", lambda: autobuild.convert("cifar_resnet20", to="pde-global",
                                         options={"K": 10**9}), "K="),
    ("folded-int", lambda: autobuild.convert("cifar_resnet20", to="dirac",
                                             options={"folded": 2}), "folded=2"),
    ("expansion-huge", lambda: autobuild.convert("cifar_resnet20", to="multiplicative",
                                                 options={"expansion": 1_000_000}),
     "expansion"),
    ("init", lambda: autobuild.convert("cifar_resnet20", to="quadratic", init=3), "init"),
    ("idle-memory", lambda: autobuild.convert("cifar_resnet20", to="quadratic", options={
        "type": "t2", "memory": "save"}), "option memory=save of quadratic changes nothing"),
    ("idle-volterra-limit", lambda: autobuild.convert("cifar_resnet20", to="quadratic", options={
        "volterra_max_params": 9}), "option volterra_max_params=9 of quadratic changes nothing"),
    ("idle-token-ratio", lambda: autobuild.convert("cifar_resnet20", to="parameter-free",
                                                   options={"ratio": 4}),
     "option ratio=4 of parameter-free changes nothing here (it shapes attention sites"),
    ("idle-ball", lambda: autobuild.convert("cifar_resnet20", to="multiplicative", options={
        "hardball": "none", "ball": "soft"}), "option ball=soft of multiplicative changes nothing"),
    ("idle-ql-memory", lambda: autobuild.convert("cifar_resnet20", to="multiplicative", options={
        "dw_kernels": 4, "memory": "save"}), "option memory=save of multiplicative changes "
     "nothing here (blocks with dw_kernels run the plain formulation)"),
    ("placement-int", lambda: autobuild.Placement(5), "placement"),
    ("register-duplicate", lambda: autobuild.register_variant(_Impostor), "quadratic"),
    ("save-no-plan", lambda: autobuild.save(__import__("torch").nn.Linear(1, 1), "x"),
     "plan"),
    ("load-missing", lambda: autobuild.load("/nonexistent/autobuild-model"), "nonexistent"),
    ("config-epochs-float", lambda: TrainConfig(epochs=2.5), "epochs"),
    ("config-amp-int", lambda: TrainConfig(amp=1), "amp"),
    ("config-lr-neg", lambda: TrainConfig(lr=-1.0), "lr"),
    ("config-unknown", lambda: TrainConfig(epoch=3), "epoch"),
    ("config-clip-grad-neg", lambda: TrainConfig(clip_grad=-1.0), "clip_grad"),
    ("param-groups-decay-neg", lambda: param_groups(torch.nn.Linear(2, 2), -1.0),
     "weight_decay"),
    ("param-groups-decay-nan", lambda: param_groups(torch.nn.Linear(2, 2), float("nan")),
     "weight_decay"),
    ("register-model-size-0", lambda: autobuild.register_model(
        "bad-size", torch.nn.Identity, input_size=(3, 0, 32)), "(3, 0, 32)"),
    ("register-model-classes-0", lambda: autobuild.register_model(
        "bad-classes", torch.nn.Identity, num_classes=0), "num_classes"),
    ("register-model-not-callable", lambda: autobuild.register_model("bad-builder", 3),
     "builder"),
    ("register-model-timm-name", lambda: autobuild.register_model(
        "timm:resnet18", torch.nn.Identity), "timm:"),
    # seeds went to torch.manual_seed as given: 2.5 was seed 2, True seed 1, "x" a bare
    # ValueError from torch
    *[(f"convert-seed-{i}", lambda s=seed: autobuild.convert("cifar_resnet20", "quadratic",
                                                            seed=s),
       f"seed must be an integer in 0..4294901759, got {seed!r}")
      for i, seed in enumerate(["x", 2.5, True, -1, 2**70])],
    ("build-plan-seed", lambda: autobuild.build_plan(autobuild.plan_of(autobuild.convert(
        "cifar_resnet20", "quadratic")), seed=1.5), "seed must be an integer"),
    # these were bare torch or Python exceptions
    ("count-channels", lambda: autobuild.count(torch.nn.Conv2d(3, 3, 1), (1, 8, 8)),
     "fails on an input of size (1, 8, 8)"),
    ("masked-none", lambda: autobuild.masked(_converted(), None).__enter__(),
     "masked() takes a site name or a list"),
    ("masked-int", lambda: autobuild.masked(_converted(), 3).__enter__(), "got 3"),
    ("build-plan-dict", lambda: autobuild.build_plan({"model": "cifar_resnet20"}),
     "build_plan() takes a Plan"),
    ("build-plan-device", lambda: autobuild.build_plan(autobuild.plan_of(_converted()),
                                                       device="tpu"), "unknown device 'tpu'"),
    ("leaf-module-int", lambda: autobuild.register_leaf_module(int), "nn.Module class"),
    ("plan-format", lambda: autobuild.plan_of(_converted()).dumps(fmt="toml"),
     "unknown plan format 'toml'"),
    ("plan-format-loads", lambda: autobuild.Plan.loads("{}", fmt="toml"), "valid: yaml, json"),
    ("primary-option", lambda: autobuild.register_variant(_NoSuchPrimary),
     "primary_option 'nope' names none of its options"),
]


@pytest.mark.parametrize("call,word", [pytest.param(c, w, id=i) for i, c, w in API_CASES])
def test_api_refuses_with_autobuild_error(call: Callable[[], Any], word: str,
                                          tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AutobuildError) as info:
        call()
    message = str(info.value)
    assert word in message and "\n" not in message, message
    assert list(tmp_path.iterdir()) == []


def test_a_numpy_integer_is_a_seed() -> None:
    import numpy as np

    a = autobuild.convert("cifar_resnet20", "quadratic", seed=np.int64(3))
    b = autobuild.convert("cifar_resnet20", "quadratic", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_api_accepts_a_single_pattern_string() -> None:
    """``sites="layer1*"`` is one pattern, not the characters of one."""
    model = autobuild.convert("cifar_resnet20", to="quadratic", sites="layer1.*")
    sites = autobuild.plan_of(model).placement.sites() if hasattr(
        autobuild.plan_of(model).placement, "sites") else list(autobuild.plan_of(model)
                                                               .placement)
    assert sites and all(s.startswith("layer1.") for s in sites)


_MAIN = "import sys; from autobuild.cli import main; sys.exit(main())"


def test_broken_pipe_is_not_an_error(tmp_path: Path) -> None:
    """``autobuild models | head -1``: exit 0, nothing on stderr."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(f"{sys.executable} -c '{_MAIN}' models | head -1", shell=True,
                          capture_output=True, text=True, env=env, cwd=tmp_path,
                          executable="/bin/bash")
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr


def test_version_and_debug(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("autobuild ")
    assert main(["--debug", "convert", "resnet5", "--to", "quadratic"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_colour_folder_with_a_grayscale_first_image_trains_in_colour(tmp_path: Path) -> None:
    """Channels come from the folder, not from its first image."""
    from autobuild.train import build_data

    folder = write_imagefolder(tmp_path / "mixed", {"train": 3, "val": 2})
    write_imagefolder(tmp_path / "gray", {"train": 1, "val": 1}, mode="L")
    os.replace(tmp_path / "gray" / "train" / "bright" / "000.png",
               folder / "train" / "bright" / "000.png")  # the first image read
    data = build_data(f"imagefolder:{folder}")
    assert data.input_size[0] == 3 and data.train[0][0].shape[0] == 3


def test_an_absurd_build_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The size predicted by the analysis is checked against a documented, overridable
    limit (here lowered, so that an ordinary conversion is 'absurd')."""
    monkeypatch.setenv("AUTOBUILD_MAX_PARAMS", "100000")
    with pytest.raises(AutobuildError, match="AUTOBUILD_MAX_PARAMS"):
        autobuild.convert("cifar_resnet20", to="quadratic")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parameters" in err and "nothing was built" in err
    monkeypatch.setenv("AUTOBUILD_MAX_PARAMS", "lots")
    with pytest.raises(AutobuildError, match="AUTOBUILD_MAX_PARAMS"):
        autobuild.convert("cifar_resnet20", to="quadratic")
    monkeypatch.delenv("AUTOBUILD_MAX_PARAMS")
    monkeypatch.setenv("AUTOBUILD_MAX_MACS", "1000")
    with pytest.raises(AutobuildError, match="MACs per image"):
        autobuild.convert("cifar_resnet20", to="quadratic")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_refused_before_work(world: dict[str, str],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    run.chmod(0o500)
    try:
        before = _snapshot(run)
        assert main(["train", "--resume", str(run), "--epochs", "3", *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write" in err and "Traceback" not in err
        assert _snapshot(run) == before
    finally:
        run.chmod(0o700)


def test_option_errors_are_typed_like_other_argument_errors() -> None:
    """``except TypeError`` / ``except ValueError`` catch a bad option as they catch a bad
    num_classes (options raised the base AutobuildError)."""
    with pytest.raises(TypeError, match="option K=2.5 of pde-global must be an integer"):
        autobuild.convert("cifar_resnet20", "pde-global", options={"K": 2.5})
    with pytest.raises(ValueError, match=r"option K=1000 of pde-global must be in \[1, 100\]"):
        autobuild.convert("cifar_resnet20", "pde-global", options={"K": 1000})
    with pytest.raises(ValueError, match="option type='t9' of quadratic is not valid"):
        autobuild.convert("cifar_resnet20", "quadratic", options={"type": "t9"})
    with pytest.raises(ValueError, match="unknown option of quadratic 'typ'"):
        autobuild.convert("cifar_resnet20", "quadratic", options={"typ": "t4"})
    with pytest.raises(TypeError, match="options of quadratic must be a mapping"):
        autobuild.variants.get_variant("quadratic").parse_options(["type=t4"])


@pytest.mark.parametrize("kwargs,kind,message", [
    ({"to": 3}, TypeError, "a family is named by a string"),
    ({"to": "quadratc"}, ValueError, "unknown family 'quadratc'"),
    ({"to": "quadratic", "sites": 5}, TypeError, "sites must be a glob pattern"),
    ({"to": "quadratic", "sites": []}, ValueError, "sites is an empty list"),
    ({"to": "quadratic", "sites": [3]}, TypeError, "site patterns must be strings"),
    ({"to": "quadratic", "sites": ["nope"]}, ValueError, "matches no quadratic site"),
    ({"to": "quadratic", "options": ["type=t4"]}, TypeError, "options must be a mapping"),
    ({"to": "quadratic", "init": "keep"}, ValueError, "unknown init 'keep'"),
    ({}, ValueError, "name a family with to="),
    ({"to": "quadratic", "placement": {"fc": "quadratic"}}, ValueError, "not both"),
    ({"to": "quadratic", "input_size": "abc"}, TypeError, "input_size"),
    ({"to": "quadratic", "num_classes": "x"}, TypeError, "num_classes"),
])
def test_api_argument_errors_are_typed_as_documented(kwargs: dict, kind: type,
                                                     message: str) -> None:
    """docs/cli.md: every bad argument of the API is an AutobuildError that is also the
    ValueError or TypeError Python code expects."""
    with pytest.raises(kind, match=message) as info:
        autobuild.convert("cifar_resnet20", **kwargs)
    assert isinstance(info.value, autobuild.AutobuildError)


@pytest.mark.parametrize("call,kind,message", [
    (lambda m: autobuild.convert(m, "quadratic", sites=5), TypeError, "sites must be"),
    (lambda m: autobuild.convert(m, placement=5), TypeError, "a placement maps site names"),
    (lambda m: autobuild.convert(m, placement={"layer2.0.conv1": None}), ValueError,
     "is empty"),
    (lambda m: autobuild.convert(m, placement={"layer2.0.conv1": 7}), ValueError,
     "must be 'keep', 'family'"),
    (lambda m: autobuild.convert(m, "quadratic", num_classes=3), ValueError,
     "describe a baseline"),
    (lambda m: autobuild.convert("cifar_resnet20", "quadratic", leaf_modules=5), TypeError,
     "leaf_modules must be a list"),
    (lambda m: autobuild.convert("cifar_resnet20", "quadratic", leaf_modules=[3]), TypeError,
     "leaf_modules takes nn.Module classes"),
    (lambda m: autobuild.build_plan(autobuild.plan_of(m), device="bogus"), ValueError,
     "unknown device 'bogus'"),
])
def test_api_argument_errors_of_a_converted_model_are_typed(call, kind: type,
                                                            message: str) -> None:
    """The same for a model converted again, placements and leaf modules (a raw TypeError
    from list(5), or the base AutobuildError)."""
    converted = autobuild.convert("cifar_resnet20", "quadratic", sites=["layer1.0.conv1"])
    with pytest.raises(kind, match=message) as info:
        call(converted)
    assert isinstance(info.value, autobuild.AutobuildError)


def test_an_error_given_context_keeps_its_class_and_exit_code() -> None:
    """Errors re-raised with the file or key that caused them: of their own class, or, for
    a class of a family of one's own that takes other arguments, the base class with its
    exit code (type(exc)(message) raised a TypeError in place of the message)."""
    from autobuild.errors import InvalidValue, in_context

    class Odd(autobuild.AutobuildError):
        exit_code = 3

        def __init__(self, site: str, reason: str) -> None:
            super().__init__(f"{site}: {reason}")

    again = in_context(Odd("conv1", "too wide"), "plan.yaml: conv1: too wide")
    assert type(again) is autobuild.AutobuildError and again.exit_code == 3
    assert str(again) == "plan.yaml: conv1: too wide"
    again = in_context(InvalidValue("bad"), "key: bad")
    assert type(again) is InvalidValue and again.exit_code == 2
