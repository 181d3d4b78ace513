"""Baseline builder arguments (``--model-arg``, a plan's ``model_args``): checked with their
bounds before anything is built, refused by a builder that does not take them, recorded in
the plan, so that a saved model, a resumed run and a search trial rebuild the same network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autobuild import load, plan_of, save
from autobuild.api import analyze, convert
from autobuild.cli import main
from autobuild.errors import AutobuildError, InvalidType, InvalidValue
from autobuild.models import MODEL_ARGS, check_model_args, resolve_baseline
from autobuild.rewrite import Plan

pytest.importorskip("timm")

TINY = "timm:test_efficientnet"  # timm's 0.1M-parameter EfficientNet, 4 blocks with a path
SYNTH = "synthetic:size=3x32x32,classes=4,train=16,val=8"
FAST = ["--batch-size", "8", "--device", "cpu", "--no-progress", "--workers", "0"]


def _drop_paths(model: torch.nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]


def test_the_plan_records_them_and_a_saved_model_is_rebuilt_with_them(tmp_path: Path) -> None:
    model = convert(TINY, "quadratic", model_args={"drop_path_rate": 0.2}, num_classes=4,
                    input_size=(3, 32, 32))
    rates = _drop_paths(model)
    assert rates == pytest.approx([0.2 * i / 5 for i in range(1, 5)])  # timm: by block depth
    assert plan_of(model).model_args == {"drop_path_rate": 0.2}
    assert Plan.loads(plan_of(model).dumps()).model_args == {"drop_path_rate": 0.2}
    save(model, str(tmp_path / "m"))
    again = load(str(tmp_path / "m"))
    assert _drop_paths(again) == rates
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_plan_without_them_is_written_as_before() -> None:
    plan = plan_of(convert("cifar_resnet20", "quadratic"))
    assert plan.model_args == {} and "model_args" not in plan.to_dict()


@pytest.mark.parametrize("args,error,needle", [
    ({"drop_path_rate": 1.0}, InvalidValue, "drop_path_rate: must be less than 1"),
    ({"drop_rate": -0.1}, InvalidValue, "drop_rate: must be greater than or equal to 0"),
    ({"dropout": math.nan}, InvalidValue, "dropout"),
    ({"drop_path_rate": True}, InvalidType, "drop_path_rate: must be a valid number"),
    ({"drop_path_rate": "0.2"}, InvalidType, "drop_path_rate: must be a valid number"),
    ({"depth": 3}, InvalidValue, "'depth': unknown; valid: " + ", ".join(MODEL_ARGS)),
    (["drop_path_rate"], InvalidType, "must be a mapping"),
])
def test_bad_values_are_refused_naming_the_argument(args, error, needle) -> None:
    with pytest.raises(error, match=needle):
        check_model_args(args)
    with pytest.raises(error, match=needle):
        analyze(TINY, model_args=args)


def test_command_line_text_is_parsed_as_the_type_it_names() -> None:
    assert check_model_args({"dropout": "0.3"}, strings=True) == {"dropout": 0.3}
    assert check_model_args({"dropout": 0}) == {"dropout": 0.0}


def test_a_builder_that_does_not_take_one_refuses_it_by_name() -> None:
    with pytest.raises(InvalidValue, match="model argument dropout: resnet18's builder does "
                                           "not take it"):
        analyze("resnet18", model_args={"dropout": 0.1})
    with pytest.raises(InvalidValue, match="drop_path_rate: cifar_resnet20's builder does not"):
        analyze("cifar_resnet20", model_args={"drop_path_rate": 0.1})
    # Swin's builder passes its own stochastic depth: a second value is refused, not a bug
    with pytest.raises(InvalidValue, match="stochastic_depth_prob: swin_t's builder does not"):
        resolve_baseline("swin_t", device="meta", model_args={"stochastic_depth_prob": 0.1})
    # the detectors' builders take **kwargs and would drop them silently
    with pytest.raises(InvalidValue, match="ssd300_vgg16's would ignore them"):
        resolve_baseline("ssd300_vgg16", device="meta", model_args={"dropout": 0.3})
    with pytest.raises(AutobuildError, match="build your module with them"):
        resolve_baseline(torch.nn.Conv2d(3, 3, 1), model_args={"dropout": 0.1})


def test_torchvision_builders_take_theirs() -> None:
    module = resolve_baseline("efficientnet_b0", device="meta",
                              model_args={"dropout": 0.3, "stochastic_depth_prob": 0.1}).module
    assert module.classifier[0].p == 0.3
    assert max(m.p for m in module.modules()
               if type(m).__name__ == "StochasticDepth") == pytest.approx(0.1 * 15 / 16)


def test_a_converted_model_keeps_the_arguments_of_its_plan() -> None:
    model = convert(TINY, "quadratic", model_args={"drop_rate": 0.1}, input_size=(3, 32, 32))
    with pytest.raises(AutobuildError, match="model_args describe a baseline"):
        convert(model, "parameter-free", model_args={"drop_rate": 0.2})


def test_a_corrupt_plan_entry_is_named() -> None:
    text = plan_of(convert("cifar_resnet20", "quadratic")).dumps() + "model_args: [0.1]\n"
    with pytest.raises(AutobuildError, match="'model_args' must map argument names"):
        Plan.loads(text)


def test_the_command_line_records_and_reports_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["convert", TINY, "--to", "quadratic", "--input-size", "3,32,32", "--json",
                 "--model-arg", "drop_path_rate=0.1", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["model_args"] == {"drop_path_rate": 0.1}
    assert "drop_path_rate: 0.1" in (out / "plan.yaml").read_text()
    assert main(["inspect", str(out)]) == 0
    assert f"{TINY} (drop_path_rate=0.1) ->" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--model-arg", "drop_path_rate=1"], "argument --model-arg: drop_path_rate: must be less "
                                          "than 1, got '1'"),
    (["--model-arg", "drop_path_rate"], "takes NAME=VALUE"),
    (["--model-arg", "width=2"], "'width': unknown; valid: drop_path_rate"),
    (["--model-arg", "dropout=0.1", "--model-arg", "dropout=0.2"], "dropout is given twice"),
    (["--model-arg", "dropout=0.1"], "model argument dropout: timm:test_efficientnet's builder "
                                     "does not take it"),
])
def test_bad_flags_are_one_line_exit_2(argv, needle, capsys) -> None:
    assert main(["convert", TINY, "--to", "quadratic", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_training_and_resuming_rebuild_the_network_with_them(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", TINY, "--to", "quadratic", "--data", SYNTH, "--epochs", "1",
                 "--model-arg", "drop_path_rate=0.2", "--out", str(run), *FAST]) == 0
    assert plan_of(load(str(run))).model_args == {"drop_path_rate": 0.2}
    # --resume continues the run as it was built: the plan's arguments, none given again
    assert main(["train", "--resume", str(run), "--model-arg", "drop_path_rate=0.1"]) == 2
    assert "takes no --model-arg" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", *FAST]) == 0
    assert len(_drop_paths(load(str(run)))) == 4


def test_a_baseline_too_large_for_memory_is_refused_in_one_line(monkeypatch) -> None:
    """A classifier for 10^6 classes asks for many GB: the allocator's failure is
    reported as a bad --num-classes, not a traceback (the allocation is simulated here)."""
    def build(name, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 256000000000 bytes.")

    monkeypatch.setattr("autobuild.models.baseline.build_model", build)
    with pytest.raises(AutobuildError, match="cifar_resnet20 with 5000000 classes: not "
                                             "enough memory for its weights"):
        resolve_baseline("cifar_resnet20", num_classes=5 * 10**6)
    with pytest.raises(AutobuildError, match="num_classes must be at most 10,000,000"):
        resolve_baseline("cifar_resnet20", num_classes=10**9)  # refused before building


def test_other_runtime_errors_of_a_builder_are_not_disguised(monkeypatch) -> None:
    def build(name, **kw):
        raise RuntimeError("a bug in a builder")

    monkeypatch.setattr("autobuild.models.baseline.build_model", build)
    with pytest.raises(RuntimeError, match="a bug in a builder"):
        resolve_baseline("cifar_resnet20")
