"""The training loop end to end on generated data: it learns, resumes exactly, evaluates
what it recorded, stops on divergence and never overwrites another run."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.train import DivergedError, TrainConfig, build_data, train

FAST = ["--batch-size", "16", "--device", "cpu", "--no-progress", "--workers", "0"]


def _rows(run: str) -> list[dict[str, str]]:
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_learns_an_easy_task_and_evaluate_reproduces_it(easy_folder: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = str(tmp_path / "run")
    assert main(["train", "cifar_resnet20", "--data", f"imagefolder:{easy_folder}",
                 "--epochs", "2", "--out", run, *FAST]) == 0
    assert {"plan.yaml", "weights.safetensors", "last.safetensors", "checkpoint.pt",
            "metrics.csv", "train.yaml"} <= set(os.listdir(run))
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr",
            "images_per_s", "seconds", "peak_mem_mb"} <= set(rows[0])
    best = max(float(r["val_top1"]) for r in rows)
    assert best >= 85.0  # chance is 50%
    capsys.readouterr()
    assert main(["evaluate", run, "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 64
    assert result["val_top1"] == pytest.approx(best, abs=1e-3)
    # The class names are recorded: data naming its classes otherwise is refused (the
    # labels would be scored against the wrong classes, without any error).
    assert yaml.safe_load(Path(run, "train.yaml").read_text())["data"]["classes"] == [
        "bright", "dark"]
    renamed = tmp_path / "renamed"
    shutil.copytree(easy_folder, renamed)
    for split in ("train", "val"):
        os.rename(renamed / split / "dark", renamed / split / "a-dark")  # now class 1
    assert main(["evaluate", run, "--data", f"imagefolder:{renamed}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "names its classes differently from the run trained on" in err
    assert "label 0 is 'a-dark' here and 'bright' there" in err and err.count("\n") == 1


def test_resume_matches_an_uninterrupted_run(easy_folder: str, tmp_path: Path) -> None:
    args = ["cifar_resnet20", "--to", "quadratic", "--data", f"imagefolder:{easy_folder}",
            "--epochs", "2", *FAST]
    full = str(tmp_path / "full")
    assert main(["train", *args, "--out", full]) == 0
    # The same run stopped after epoch 1 (as a search prunes it), then resumed by the CLI.
    from autobuild.cli import build_parser
    from autobuild.cli._common import model_from_args
    from autobuild.cli.train import _fit_to_data

    ns = build_parser().parse_args(["train", *args])
    data = build_data(f"imagefolder:{easy_folder}")
    _fit_to_data(ns, data)
    part = str(tmp_path / "part")
    cfg = TrainConfig(epochs=2, batch_size=16, device="cpu", workers=0)
    torch.manual_seed(0)  # as the CLI does before building the model (--seed 0)
    stopped = train(model_from_args(ns, allow_baseline=True, seed=0)[0], data, cfg,
                    out_dir=part, callback=lambda m: m.epoch < 1)
    assert stopped.stopped_early and len(stopped.history) == 1
    assert main(["train", "--resume", part, "--device", "cpu", "--no-progress"]) == 0
    a, b = load_file(os.path.join(full, "last.safetensors")), \
        load_file(os.path.join(part, "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ra, rb = _rows(full), _rows(part)
    for key in ("epoch", "train_loss", "val_loss", "val_top1", "lr"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


def test_one_channel_data_flows_into_the_model(tmp_path: Path) -> None:
    run = str(tmp_path / "gray")
    spec = "synthetic:size=1x16x16,classes=3,train=32,val=16"
    assert main(["train", "cifar_resnet20", "--to", "quadratic", "--data", spec, "--epochs",
                 "1", "--out", run, *FAST]) == 0
    plan = open(os.path.join(run, "plan.yaml")).read()
    assert "num_classes: 3" in plan and "- 1\n- 16\n- 16" in plan


def test_recipe_options_run(tmp_path: Path) -> None:
    """AdamW, EMA, label smoothing, bf16 autocast and fp16 + GradScaler all run on CPU."""
    spec = "synthetic:size=3x8x8,classes=4,train=32,val=16"
    for extra in (["--optimizer", "adamw", "--ema", "0.9", "--label-smoothing", "0.1",
                   "--amp"], ["--amp", "--amp-dtype", "fp16", "--clip-grad", "1.0"]):
        run = str(tmp_path / extra[1])
        assert main(["train", "cifar_resnet20", "--data", spec, "--epochs", "1", "--out", run,
                     *FAST, *extra]) == 0
        assert len(_rows(run)) == 1


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("nan")


def test_divergence_stops_the_run() -> None:
    data = build_data("synthetic:size=3x8x8,classes=4,train=32,val=8")
    with pytest.raises(DivergedError, match="non-finite loss in epoch 1") as info:
        train(_NaNNet(), data, TrainConfig(epochs=1, batch_size=8, device="cpu"))
    assert info.value.exit_code == 3


def test_divergence_exit_code_is_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "cifar_resnet20", "--data", "synthetic:size=3x8x8,classes=4,train=32,"
                 "val=8", "--epochs", "1", "--lr", "1000", "--clip-grad", "0",
                 "--warmup-epochs", "0", "--out", str(tmp_path / "d"), *FAST])
    assert code == 3
    assert "diverged" in capsys.readouterr().err


def test_a_resume_on_other_data_is_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = "synthetic:size=3x8x8,classes=4,train=16,val=8"
    assert main(["train", "cifar_resnet20", "--data", first, "--epochs", "1", "--out",
                 str(run), *FAST]) == 0
    second = "synthetic:size=3x8x8,classes=4,train=32,val=8"
    assert main(["train", "--resume", str(run), "--epochs", "2", "--data", second,
                 *FAST]) == 0
    record = yaml.safe_load((run / "train.yaml").read_text())
    (entry,) = record["resumes"]
    assert entry["after_epoch"] == 1 and entry["changed"]["epochs"] == [1, 2]
    assert [d["spec"] for d in entry["changed"]["data"]] == [first, second]
    assert record["data"]["spec"] == second


def test_run_dir_collision_and_corrupt_checkpoint(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "taken"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n1\n")
    args = ["train", "cifar_resnet20", "--data", "synthetic:size=3x8x8,classes=4,train=16,val=8",
            "--epochs", "1", "--out", str(run), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err  # metrics but no checkpoint: nothing --resume could continue
    assert "stopped before its first checkpoint" in err and "--force" in err
    assert (run / "metrics.csv").read_text() == "epoch\n1\n"  # untouched
    assert main([*args, "--force"]) == 0
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert main(["train", "--resume", str(run)]) == 2
    assert "corrupt checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["train", "cifar_resnet20", "--device", "cpu"], "--data is required"),
        (["train", "cifar_resnet20", "--data", "bogus"], "unknown data spec 'bogus'"),
        (["train", "cifar_resnet20", "--data", "cifar10", "--data-dir", str(tmp_path)],
         "cifar10 not found"),
        (["train", "cifar_resnet20", "--data", "synthetic:classes=4", "--num-classes", "10"],
         "--num-classes 10 but synthetic:classes=4 has 4 classes"),
        (["evaluate", str(tmp_path / "missing"), "--data", "synthetic"], "not a saved model"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "x")] if argv[0] == "train" else argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(AutobuildError, match=r"optimizer \(--optimizer\): must be 'sgd' or"):
        TrainConfig(optimizer="lamb")


def test_sigterm_records_the_run_as_interrupted_and_exits_143(tmp_path: Path) -> None:
    """A scheduler's SIGTERM used to kill the process with ``status: running`` on disk."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autobuild", "train", "cifar_resnet20", "--data",
         "synthetic:size=3x16x16,classes=4,train=256,val=32", "--epochs", "40", "--out",
         str(run), "--batch-size", "16", "--device", "cpu", "--no-progress", "--workers", "2"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # (into the next epoch: its data-loader workers are running)
    # As a scheduler does: to the whole process group, the data-loader workers included
    # (a worker killed by it made the main process fail with "worker killed", exit 1).
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.rstrip().endswith("autobuild: terminated")
    assert yaml.safe_load((run / "train.yaml").read_text())["status"] == "interrupted"
    done = len(_rows(str(run)))
    assert main(["train", "--resume", str(run), "--epochs", str(done + 1), *FAST]) == 0
    assert len(_rows(str(run))) == done + 1


def test_resuming_a_run_of_an_earlier_version_records_no_data_change(tmp_path: Path) -> None:
    """Runs recorded before the class names were kept: their null ``classes`` is not a
    change of data when they are resumed."""
    run = tmp_path / "run"
    spec = "synthetic:size=3x8x8,classes=4,train=16,val=8"
    assert main(["train", "cifar_resnet20", "--data", spec, "--epochs", "1", "--out",
                 str(run), *FAST]) == 0
    record = yaml.safe_load((run / "train.yaml").read_text())
    del record["data"]["classes"]  # as an earlier version wrote it
    (run / "train.yaml").write_text(yaml.safe_dump(record))
    assert main(["train", "--resume", str(run), "--epochs", "2", *FAST]) == 0
    (entry,) = yaml.safe_load((run / "train.yaml").read_text())["resumes"]
    assert "data" not in entry["changed"], entry


def test_a_resume_takes_the_recipe_train_yaml_holds(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """train.yaml holds the latest recipe asked for: a hand edit of its config applies (it
    used to be overwritten by the checkpoint's silently), checked like a flag."""
    run = tmp_path / "run"
    assert main(["train", "cifar_resnet20", "--data", "synthetic:size=3x8x8,classes=4,"
                 "train=16,val=8", "--epochs", "1", "--out", str(run), *FAST]) == 0
    path = run / "train.yaml"
    record = yaml.safe_load(path.read_text())
    record["config"]["epochs"] = 0
    path.write_text(yaml.safe_dump(record))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.yaml" in err and "config" in err, err
    if not torch.cuda.is_available():  # a recorded setting is named as recorded
        record["config"].update(epochs=2, sync_bn=True)
        path.write_text(yaml.safe_dump(record))
        assert main(["train", "--resume", str(run)]) == 2
        assert f"sync_bn (recorded in {path}: edit it there) needs CUDA" in \
            capsys.readouterr().err
    record["config"].update(epochs=2, label_smoothing=0.1, sync_bn=False)
    path.write_text(yaml.safe_dump(record))
    # a flag given now that the recorded recipe makes idle is refused, naming both
    assert main(["train", "--resume", str(run), "--amp-dtype", "bf16"]) == 2
    assert (f"--amp-dtype bf16: it sets the precision of AMP, which is off; turn on amp "
            f"(recorded in {path}: edit it there)") in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [r["epoch"] for r in _rows(str(run))] == ["1", "2"]
    record = yaml.safe_load(path.read_text())
    (entry,) = record["resumes"]  # (changes against the record: the edit is no change)
    assert entry == {"after_epoch": 1, "changed": {}}
    assert record["config"]["label_smoothing"] == 0.1 and record["config"]["epochs"] == 2


def test_the_default_lr_scales_with_the_batch_a_step_really_sees() -> None:
    """A --batch-size above the training set's size trains on the whole set per step: the
    linear scaling rule applies to that batch, not to the nominal one (which diverged)."""
    from autobuild.train.session import Session

    cfg = TrainConfig(batch_size=512, device="cpu")
    assert Session(nn.Linear(2, 2), cfg, train_images=32).opt.param_groups[0]["lr"] == \
        pytest.approx(0.1 * 32 / 128)
    assert Session(nn.Linear(2, 2), cfg, train_images=4096).opt.param_groups[0]["lr"] == \
        pytest.approx(0.1 * 512 / 128)
    given = TrainConfig(batch_size=512, lr=0.3, device="cpu")
    assert Session(nn.Linear(2, 2), given, train_images=32).opt.param_groups[0]["lr"] == 0.3


def test_a_refused_forced_run_loses_nothing(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """A model that cannot take the data is refused before --force clears the directory,
    and before a saved model given as the run gets its init.safetensors."""
    run = str(tmp_path / "run")
    four = "synthetic:size=3x8x8,classes=4,train=16,val=8"
    assert main(["train", "cifar_resnet20", "--data", four, "--epochs", "1", "--out", run,
                 *FAST]) == 0
    before = sorted(os.listdir(run))
    ten = four.replace("classes=4", "classes=10")
    assert main(["train", run, "--data", ten, "--epochs", "1", "--out", run, "--force",
                 *FAST]) == 2
    assert "has 10 classes" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before
    saved = str(tmp_path / "saved")
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--num-classes", "4",
                 "--input-size", "3,8,8", "--out", saved]) == 0
    assert main(["train", saved, "--data", ten, "--epochs", "1", *FAST]) == 2
    assert "has 10 classes" in capsys.readouterr().err
    assert sorted(os.listdir(saved)) == ["plan.yaml", "weights.safetensors"]
    assert main(["train", run, "--data", ten, "--out", str(tmp_path / "new" / "x"),
                 *FAST]) == 2
    assert not (tmp_path / "new").exists()


def test_a_saved_model_trained_again_in_place_restarts_from_its_own_weights(
        tmp_path: Path) -> None:
    """`train SAVED --force` after a run there: init.safetensors stays the weights the model
    was saved with (the last run's result overwrote it), and the new run starts from them."""
    spec = "synthetic:size=3x8x8,classes=4,train=16,val=8"
    saved = tmp_path / "saved"
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", "--num-classes", "4",
                 "--input-size", "3,8,8", "--out", str(saved)]) == 0
    original = load_file(saved / "weights.safetensors")
    assert main(["train", str(saved), "--data", spec, "--epochs", "1", *FAST]) == 0
    first = load_file(saved / "weights.safetensors")
    assert any(not torch.equal(first[k], original[k]) for k in original)
    assert main(["train", str(saved), "--data", spec, "--epochs", "1", "--force",
                 *FAST]) == 0
    init = load_file(saved / "init.safetensors")
    assert all(torch.equal(init[k], original[k]) for k in original)
    again = load_file(saved / "weights.safetensors")  # the same start, recipe and seed
    assert all(torch.equal(again[k], first[k]) for k in first)
    # Training it further elsewhere: without --data, on the data the run recorded (as
    # evaluate and analyze read it; --data was required).
    tuned = tmp_path / "tuned"
    assert main(["train", str(saved), "--epochs", "1", "--out", str(tuned), *FAST]) == 0
    assert yaml.safe_load((tuned / "train.yaml").read_text())["data"]["spec"] == spec


def test_default_run_directories_of_a_plan_and_a_placement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runs/MODEL-FAMILY names what trains: a --plan's model and family, a --placement's
    families (they went to runs/None-baseline and runs/MODEL-baseline)."""
    monkeypatch.chdir(tmp_path)
    spec = "synthetic:size=3x8x8,classes=4,train=16,val=8"
    assert main(["convert", "cifar_resnet20", "--to", "dirac", "--num-classes", "4",
                 "--input-size", "3,8,8", "--out", "d"]) == 0
    Path("pl.yaml").write_text("layer1.0.conv1: quadratic\nlayer2: pde-global\n")
    assert main(["train", "--plan", "d/plan.yaml", "--data", spec, "--epochs", "1",
                 *FAST]) == 0
    assert main(["train", "cifar_resnet20", "--placement", "pl.yaml", "--data", spec,
                 "--epochs", "1", *FAST]) == 0
    assert sorted(os.listdir("runs")) == ["cifar_resnet20-dirac", "cifar_resnet20-mixed"]


def test_a_repeated_milestone_is_refused_for_a_new_recipe_only() -> None:
    """An older run record may hold a repeated milestone (each one a decay): it still loads;
    a new recipe is asked to give each once."""
    from autobuild.train.config import check_new_recipe

    cfg = TrainConfig(epochs=10, lr_schedule="multistep", lr_milestones=[5, 2, 5])
    assert cfg.milestones() == [2, 5, 5]
    with pytest.raises(AutobuildError, match=r"\[2, 5, 5\]: epoch 5 is given twice"):
        check_new_recipe(cfg)


def test_force_never_deletes_what_the_run_reads(easy_folder: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """--force replaces --out whole: an --out that is or holds the data, the saved model,
    the plan or placement file the run reads is refused (each was deleted), and so is a
    directory that holds nothing autobuild wrote (a folder of study databases, a dataset)."""
    run = tmp_path / "run"  # a run, in which the user keeps what the next run reads
    assert main(["train", "cifar_resnet20", "--data", "synthetic:size=3x8x8,classes=2,"
                 "train=16,val=8", "--epochs", "1", "--out", str(run), *FAST]) == 0
    data = run / "data"
    shutil.copytree(easy_folder, data)
    spec = f"imagefolder:{data}"
    saved = run / "model"  # (put there by the user: autobuild writes no output inside another)
    assert main(["convert", "cifar_resnet20", "--to", "dirac", "--num-classes", "2",
                 "--input-size", "3,32,32", "--out", str(tmp_path / "model")]) == 0
    shutil.move(tmp_path / "model", saved)
    (run / "p.yaml").write_text("layer1.0.conv1: quadratic\n")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "s1.db").write_bytes(b"SQLite format 3\0")
    before = {p: sorted(os.listdir(p)) for p in (run, data, saved, tmp_path / "st")}
    out = ["--out", str(run)]
    cases = [
        (["cifar_resnet20", "--data", spec, *out], f"'{run}' holds '{data}', which this"),
        ([str(saved), "--data", spec, *out], f"holds '{saved}', which this command must keep"),
        (["--plan", str(saved / "plan.yaml"), "--data", spec, *out],
         "plan.yaml', which this command must keep"),
        (["cifar_resnet20", "--placement", str(run / "p.yaml"), "--data", spec, *out],
         "p.yaml', which this command must keep"),
        (["cifar_resnet20", "--data", spec, "--out", str(tmp_path / "st")],
         "holds nothing autobuild wrote (s1.db): --force replaces a run"),
        (["cifar_resnet20", "--data", spec, "--out", str(data)],
         f"'{data}' is '{data}', which this command must keep"),
        (["cifar_resnet20", "--data", "synthetic", "--out", str(data)],
         "holds nothing autobuild wrote (train, val)"),
    ]
    for argv, needle in cases:
        assert main(["train", *argv, "--force", "--epochs", "1", *FAST]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
    # analyze --force: not the data it reads either
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    assert main(["analyze", str(other), "--data", spec, *out, "--force", "--device",
                 "cpu"]) == 2
    assert f"holds '{data}', which this command must keep" in capsys.readouterr().err
    assert before == {p: sorted(os.listdir(p)) for p in before}
