"""Every command through main(argv); every bad input is one line on stderr and exit 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from autobuild.cli import main
from autobuild.models import build_model


def _json(capsys) -> object:
    return json.loads(capsys.readouterr().out)


def test_models_and_variants(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet20" in out and "resnet50" in out and "ssd300_vgg16" in out
    assert main(["variants", "--json"]) == 0
    families = {v["name"]: v for v in _json(capsys)}
    assert "type" in [o["name"] for o in families["quadratic"]["options"]]
    assert main(["variants"]) == 0  # each option says what it takes
    out = capsys.readouterr().out
    assert "--option K=1 [int 1..100]" in out and "--option dt=0.2 [float > 0]" in out
    assert "--option expansion=qlnet [float > 0, <= 16 or qlnet]" in out
    assert main(["variants", "pde_global", "dirac", "--json"]) == 0  # only those, in order
    assert [v["name"] for v in _json(capsys)] == ["pde-global", "dirac"]
    assert main(["variants", "diracc"]) == 2
    assert "unknown family 'diracc' (did you mean dirac?)" in capsys.readouterr().err


def test_sites_json(capsys) -> None:
    assert main(["sites", "cifar_resnet20", "--to", "quadratic", "--json"]) == 0
    sites = _json(capsys)
    assert sites[0]["name"] == "conv1"
    assert {"name", "kind", "in_channels", "out_channels", "kernel_size", "stride",
            "output_shape", "params", "macs"} <= set(sites[0])
    assert main(["sites", "cifar_resnet20", "--to", "quadratic"]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out


def test_convert_json_out_and_inspect(tmp_path, capsys) -> None:
    out = str(tmp_path / "r20q")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--option", "type=ours",
                 "--init", "preserve", "--out", out, "--json"]) == 0
    result = _json(capsys)
    for key in ("model", "family", "options", "sites", "params", "macs", "flops",
                "max_abs_diff"):
        assert key in result
    assert result["params"]["after"] > 2.9 * result["params"]["before"]
    assert result["max_abs_diff"] <= 1e-4 * result["max_abs_output"]
    assert sorted(os.listdir(out)) == ["plan.yaml", "weights.safetensors"]
    assert main(["inspect", out, "--json"]) == 0
    inspected = _json(capsys)
    assert inspected["params"] == result["params"] and inspected["macs"] == result["macs"]
    assert main(["inspect", out]) == 0
    assert "params" in capsys.readouterr().out
    # --plan rebuilds the same conversion
    assert main(["convert", "--plan", os.path.join(out, "plan.yaml"), "--json"]) == 0
    assert _json(capsys)["sites"] == result["sites"]
    # ...and so does a plan given as --placement, in the plan's init (it was scratch)
    assert main(["convert", "cifar_resnet20", "--placement", os.path.join(out, "plan.yaml"),
                 "--json"]) == 0
    again = _json(capsys)
    assert again["sites"] == result["sites"] and again["init"] == "preserve"
    assert again["max_abs_diff"] <= 1e-4 * again["max_abs_output"]


def test_convert_sites_input_size_and_table(capsys) -> None:
    assert main(["convert", "cifar_vgg16", "--to", "quadratic", "--sites", "features.*",
                 "--num-classes", "10", "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "13 sites" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("features.")]
    assert rows == sorted(rows, key=lambda r: int(r.split(".")[1]))  # the network's order


def test_refuses_to_overwrite(tmp_path, capsys) -> None:
    (tmp_path / "mine.txt").write_text("x")
    rc = main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(tmp_path)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    # --force replaces a directory autobuild wrote, never a user's other files
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(tmp_path),
                 "--force"]) == 2
    assert "holds nothing autobuild wrote (mine.txt)" in capsys.readouterr().err
    (tmp_path / "mine.txt").unlink()
    assert main(["convert", "cifar_resnet20", "--to", "dirac", "--out", str(tmp_path)]) == 0
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(tmp_path),
                 "--force"]) == 0


@pytest.mark.parametrize("argv,needle", [
    (["convert", "resnet5", "--to", "quadratic"], "unknown model 'resnet5'"),
    (["convert", "resnet18", "--to", "cubic"], "unknown family 'cubic'"),
    (["convert", "resnet18", "--to", "quadratic", "--option", "kind=ours"],
     "unknown option of quadratic 'kind'; valid: memory, shortcuts, stem, type"),
    (["convert", "resnet18", "--to", "quadratic", "--option", "type=t9"], "valid: ours, t2"),
    (["convert", "resnet18", "--to", "quadratic", "--option", "type"], "name=value"),
    (["convert", "cifar_resnet20", "--to", "quadratic", "--sites", "layer9.*"],
     "valid sites: conv1"),
    (["convert", "cifar_resnet20", "--to", "quadratic", "--input-size", "3,32"], "C,H,W"),
    (["convert", "cifar_resnet20", "--to", "quadratic", "--input-size", "-3,32,32"],
     "a value starting with '-' is written --input-size=VALUE"),
    (["convert", "cifar_resnet20", "--to", "quadratic", "--input-size=-3,32,32"],
     "must be C,H,W of positive integers"),
    (["convert", "cifar_resnet20", "--to"], "argument --to: expected one argument (see"),
    (["convert", "cifar_resnet20"], "--to FAMILY"),
    (["sites", "cifar_resnet20", "--to", "quadratic", "--bogus"],
     "unrecognized arguments: --bogus (see `autobuild sites --help`)"),
    (["inspect", "/nonexistent/run"], "not a saved model directory"),
    (["convert", "--plan", "/nonexistent/plan.yaml"], "does not exist"),
    # raised inside torch.fx's interpreter, which appends the graph node to the message
    (["convert", "cifar_darts_v2_aux", "--to", "quadratic", "--input-size", "3x64x64"],
     "takes 8x8 features"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err and "While executing" not in err


def test_corrupt_files_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "plan.yaml").write_text("autobuild_plan: 1\nmodel: [")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "corrupt plan" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", str(run)]) == 0
    capsys.readouterr()
    (run / "weights.safetensors").write_bytes(b"\x00" * 16)
    assert main(["inspect", str(run)]) == 2
    assert "corrupt weights" in capsys.readouterr().err


def test_debug_env_shows_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setenv("AUTOBUILD_DEBUG", "1")
    assert main(["convert", "resnet5", "--to", "quadratic"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script_entry_point() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "autobuild", "convert", "nope", "--to", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("autobuild: error: unknown model")


def test_convert_with_a_mixed_placement_file(tmp_path, capsys) -> None:
    placement = tmp_path / "placement.yaml"
    placement.write_text("layer1.0.conv1: quadratic:ours\nlayer2.0: multiplicative\n"
                         "layer3: pde-global\n")
    out = str(tmp_path / "run")
    assert main(["convert", "cifar_resnet20", "--placement", str(placement), "--out", out,
                 "--json"]) == 0
    result = _json(capsys)
    assert result["family"] == "mixed"
    assert [s["site"] for s in result["sites"]] == ["layer1.0.conv1", "layer2.0", "layer3"]
    assert main(["inspect", out, "--json"]) == 0
    assert _json(capsys)["placement_key"] == result["placement_key"]
    placement.write_text("layer1.0.conv1: quadratic:ours\nlayer1.0: multiplicative\n")
    assert main(["convert", "cifar_resnet20", "--placement", str(placement)]) == 2
    err = capsys.readouterr().err
    assert "layer1.0.conv1" in err and "layer1.0 " in err and "overlap" in err


def test_sites_of_every_family(capsys) -> None:
    assert main(["sites", "cifar_resnet20", "--to", "all", "--json"]) == 0
    sites = {s["name"]: s for s in _json(capsys)}
    assert set(sites["network"]["families"]) == {"pde-global", "dirac"}  # qlnet: torchvision
    assert "quadratic" in sites["layer1.0.conv1"]["default_for"]
    assert "quadratic" not in sites["conv1"]["default_for"]  # the stem is not a default
    assert {"multiplicative"} <= set(sites["layer1.0"]["families"])
    assert main(["sites", "cifar_resnet20"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "pde-global*" in out


def test_sigterm_switches_torchs_sigchld_handler_off_before_it_runs() -> None:
    """A scheduler's SIGTERM reaches the data-loader workers too; the SIGCHLD of their
    death must not run torch's handler ("worker killed by signal") in the middle of the
    unwinding. Both signals pending at once: SIGTERM's handler runs first and switches
    SIGCHLD's off."""
    import signal
    import threading
    import time

    from autobuild import cli
    from autobuild.cli import sigterm_raises
    from autobuild.errors import Terminated

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    calls: list[int] = []
    previous = signal.signal(signal.SIGCHLD, lambda *args: calls.append(1))
    both = {signal.SIGTERM, signal.SIGCHLD}
    try:
        with pytest.raises(Terminated), sigterm_raises():
            # (to this thread: sent to the process, another thread could take one early)
            signal.pthread_sigmask(signal.SIG_BLOCK, both)
            signal.pthread_kill(threading.get_ident(), signal.SIGCHLD)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            for _ in range(200):  # (handlers run between bytecodes)
                time.sleep(0.001)
        for _ in range(50):
            time.sleep(0.001)
        assert calls == []
        assert signal.getsignal(signal.SIGCHLD) is cli._ignore
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
        signal.signal(signal.SIGCHLD, previous)


def test_inspect_says_whether_the_weights_are_finite(tmp_path, capsys) -> None:
    """Weights saved from a run that blew up load and count like good ones: inspect names
    the tensors that hold NaN/inf."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "r20")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--out", out]) == 0
    capsys.readouterr()
    assert main(["inspect", out]) == 0
    assert "weights: all finite" in capsys.readouterr().out
    path = os.path.join(out, "weights.safetensors")
    tensors = load_file(path)
    tensors["fc.weight"][0, :3] = float("nan")
    tensors["fc.bias"][1] = float("inf")
    save_file(tensors, path)
    assert main(["inspect", out]) == 0
    assert "weights: 4 NaN/inf values in 2 tensors (fc.weight, fc.bias)" in \
        capsys.readouterr().out
    assert main(["inspect", out, "--json"]) == 0
    assert _json(capsys)["nonfinite"] == {"fc.weight": 3, "fc.bias": 1}


def test_inspect_says_why_a_preserving_conversion_is_not_measured(tmp_path, capsys) -> None:
    """init=preserve of a baseline with random weights: convert measured the difference;
    inspect has no reference to measure it against and says so (it printed nothing and
    --json gave a bare null)."""
    out = str(tmp_path / "p")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--init", "preserve",
                 "--out", out]) == 0
    assert "max |output - baseline| = 0 " in capsys.readouterr().out
    assert main(["inspect", out]) == 0
    assert "max |output - baseline|: not measurable from the saved model: its baseline's " \
        "weights were drawn at random" in capsys.readouterr().out
    assert main(["inspect", out, "--json"]) == 0
    summary = _json(capsys)
    assert summary["max_abs_diff"] is None and "--weights" in summary["max_abs_diff_note"]
    assert main(["convert", out, "--json"]) == 0  # (a traceback, exit 1)
    assert "--weights" in _json(capsys)["max_abs_diff_note"]


def test_inspect_measures_a_preserving_conversion_of_named_weights_again(
        tmp_path, capsys) -> None:
    """With --weights, the plan names the baseline's weights: inspect loads them and
    measures the difference again (it read the loaded model's record, which drops them,
    and printed the random-weights note); weights moved since are said to be missing."""
    base = build_model("cifar_resnet20")
    torch.save(base.state_dict(), tmp_path / "r20.pt")
    out = str(tmp_path / "p")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--init", "preserve",
                 "--weights", str(tmp_path / "r20.pt"), "--out", out]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    summary = _json(capsys)
    assert summary["max_abs_diff"] is not None and summary["max_abs_diff"] < 1e-4
    assert "max_abs_diff_note" not in summary
    # `convert SAVED` (a copy) builds the baseline's structure only: it points to inspect
    # (it ran the data-free baseline on an input: a traceback, exit 1)
    assert main(["convert", out, "--json"]) == 0
    assert "`autobuild inspect` measures it" in _json(capsys)["max_abs_diff_note"]
    # once trained, the difference is training's, not a preservation error
    trained = str(tmp_path / "t")
    assert main(["train", out, "--data", "synthetic:size=3x32x32,classes=10,train=16,val=8",
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-progress",
                 "--out", trained]) == 0
    capsys.readouterr()
    assert main(["inspect", trained, "--json"]) == 0
    summary = _json(capsys)
    assert summary["max_abs_diff"] is None
    assert summary["max_abs_diff_note"].startswith("not a preservation check")
    os.rename(tmp_path / "r20.pt", tmp_path / "moved.pt")
    assert main(["inspect", out, "--json"]) == 0
    summary = _json(capsys)
    assert summary["max_abs_diff"] is None
    assert "the baseline's weights do not load" in summary["max_abs_diff_note"]
