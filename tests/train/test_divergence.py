"""A diverging run (issue 12): exit code 3 with its reason, for a non-finite training loss
and for a non-finite validation loss; the last good checkpoint is kept, ``train.yaml`` says
why, and the directory can be resumed (from that checkpoint) or overwritten (--force)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from autobuild.cli import main
from autobuild.train import DivergedError, TrainConfig, build_data, train

SYNTH = "synthetic:size=3x8x8,classes=4,train=32,val=16"
FAST = ["--batch-size", "16", "--device", "cpu", "--no-progress", "--workers", "0"]
EXPLODE = ["--lr", "1000", "--clip-grad", "0", "--warmup-epochs", "0"]


def _record(run: Path) -> dict:
    return yaml.safe_load((run / "train.yaml").read_text())


def _epoch_of_checkpoint(run: Path) -> int:
    return int(torch.load(run / "checkpoint.pt", weights_only=False)["epoch"])


def test_diverging_run_exits_3_and_can_be_resumed_or_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    base = ["train", "cifar_resnet20", "--data", SYNTH, "--out", str(run), *FAST]
    assert main([*base, "--epochs", "1", "--lr", "0.01"]) == 0
    capsys.readouterr()
    weights = (run / "weights.safetensors").read_bytes()
    # Epoch 2 with an absurd learning rate diverges: exit 3, one line with the reason.
    assert main(["train", "--resume", str(run), "--epochs", "2", *EXPLODE, *FAST]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    # (lr 1000 blows the loss up, or makes it NaN: either stops the run)
    assert len(err) == 1 and "diverged" in err[0] and ("non-finite" in err[0]
                                                        or "mean loss" in err[0]), err
    assert "the last good checkpoint (epoch 1) is kept" in err[0]
    record = _record(run)
    assert record["status"] == "diverged" and record["reason"] in err[0]
    assert record["epochs_done"] == 1
    assert _epoch_of_checkpoint(run) == 1  # the last good checkpoint is kept
    assert (run / "weights.safetensors").read_bytes() == weights
    # The directory is not silently reused for a new run ...
    assert main([*base, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "diverged after 1 epoch)" in err and "--resume" in err and "--force" in err
    # ... it resumes from the last good checkpoint with a saner recipe ...
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.01", *FAST]) == 0
    # (the time is the resumed epoch's: it said "2 epochs in ...")
    out = capsys.readouterr().out
    assert "; 1 epoch in " in out and "s (2 in all); saved to" in out, out
    assert _record(run)["status"] == "finished" and _epoch_of_checkpoint(run) == 2
    # ... and the record keeps every recipe it trained with: both resumes, what each changed.
    first, second = _record(run)["resumes"]
    assert first == {"after_epoch": 1, "changed": {"epochs": [1, 2], "lr": [0.01, 1000.0],
                                                   "warmup_epochs": [5.0, 0.0],
                                                   "clip_grad": ["auto", 0.0]}}
    # (the second resumes the checkpoint's recipe, that of epoch 1, with --lr 0.01)
    assert second == {"after_epoch": 1, "changed": {"lr": [1000.0, 0.01],
                                                    "warmup_epochs": [0.0, 5.0],
                                                    "clip_grad": [0.0, "auto"]}}
    # ... or is overwritten as a whole.
    assert main([*base, "--epochs", "1", "--force"]) == 0
    assert _record(run)["status"] == "finished" and _epoch_of_checkpoint(run) == 1


def test_divergence_in_the_first_epoch_leaves_nothing_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    base = ["train", "cifar_resnet20", "--data", SYNTH, "--epochs", "1", "--out", str(run),
            *FAST]
    assert main([*base, *EXPLODE]) == 3
    err = capsys.readouterr().err
    # The message does not promise a checkpoint that was never written.
    assert "no checkpoint to resume" in err and "is kept" not in err
    assert _record(run)["status"] == "diverged" and not (run / "checkpoint.pt").exists()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err and "Traceback" not in err
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--force" in err
    assert main([*base, "--force"]) == 0
    assert {"checkpoint.pt", "weights.safetensors", "plan.yaml"} <= set(os.listdir(run))
    assert _record(run)["status"] == "finished"


def test_a_non_finite_validation_loss_is_a_divergence(tmp_path: Path) -> None:
    import autobuild

    data = build_data(SYNTH)
    model = autobuild.analyze("cifar_resnet20", num_classes=4, input_size=(3, 8, 8)).build(
        autobuild.Placement())
    # Trains normally; its validation outputs are NaN (a finite training loss, a non-finite
    # validation loss: the case a check of the training loss alone lets through).
    model.register_forward_hook(lambda m, i, out: out if m.training else out * float("nan"))
    run = tmp_path / "run"
    with pytest.raises(DivergedError, match="non-finite validation loss") as info:
        train(model, data, TrainConfig(epochs=2, batch_size=16, device="cpu", workers=0,
                                       progress=False), out_dir=str(run))
    assert info.value.exit_code == 3
    record = _record(run)
    assert record["status"] == "diverged" and "validation loss" in record["reason"]
    assert record["epochs_done"] == 0 and not (run / "checkpoint.pt").exists()


def test_a_run_records_absolute_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """`--data imagefolder:rel` is recorded absolute: evaluate/resume work from elsewhere."""
    from tests.train.conftest import write_imagefolder

    write_imagefolder(tmp_path / "imgs", {"train": 8, "val": 4})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "cifar_resnet20", "--data", "imagefolder:imgs", "--epochs", "1",
                 "--out", "run", *FAST]) == 0
    assert _record(tmp_path / "run")["data"]["spec"] == f"imagefolder:{tmp_path / 'imgs'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--json"]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", *FAST]) == 0


class _Blowup(torch.nn.Module):
    """Finite logits in the millions: a cross-entropy thousands of times a uniform guess's
    (what an unnormalised residual stack reached: losses of 1e16, never NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 1e6


def test_a_finite_but_exploded_loss_stops_the_run() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=16, device="cpu", lr=1e-9, warmup_epochs=0)
    with pytest.raises(DivergedError, match=r"mean loss .* over 1386 in epoch 1"):
        train(_Blowup(), build_data(SYNTH), cfg)  # 1000 x ln(4 classes)
    # The same network at a sane scale trains.
    healthy = _Blowup()
    healthy.forward = lambda x: healthy.fc(x.flatten(1))  # type: ignore[method-assign]
    assert train(healthy, build_data(SYNTH), cfg).history


def test_weights_that_are_already_not_finite_are_refused_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not a divergence (exit 3 with lr advice, and a run directory left behind) nor a NaN
    loss reported as a result (evaluate exited 0): bad input, exit 2, nothing written."""
    from safetensors.torch import load_file, save_file

    saved = tmp_path / "saved"
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--num-classes", "4",
                 "--input-size", "3,8,8", "--out", str(saved)]) == 0
    path = saved / "weights.safetensors"
    state = load_file(path)
    state["layer1.0.conv1.weight"][0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", str(saved), "--data", SYNTH, "--epochs", "1", "--out", str(run),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert f"the weights in '{path}' are not finite: layer1.0.conv1.weight holds" in err
    assert err.count("\n") == 1 and not run.exists()
    assert main(["train", str(saved), "--data", SYNTH, "--epochs", "1", *FAST]) == 2
    assert sorted(os.listdir(saved)) == ["plan.yaml", "weights.safetensors"]
    capsys.readouterr()
    assert main(["evaluate", str(saved), "--data", SYNTH, "--device", "cpu"]) == 2
    assert f"the weights in '{path}' are not finite" in capsys.readouterr().err
    # (analyze and importance said "the model's weights", naming no file)
    assert main(["analyze", str(saved), "--data", SYNTH, "--out", str(tmp_path / "a")]) == 2
    assert f"the weights in '{path}' are not finite" in capsys.readouterr().err
    assert main(["importance", str(saved), "--data", SYNTH]) == 2
    assert f"the weights in '{path}' are not finite" in capsys.readouterr().err
