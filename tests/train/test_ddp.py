"""The DDP code path: two gloo processes on CPU under torchrun, rank 0 writing the run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``autobuild ARGS`` in two gloo processes under torchrun. In a session of its own, so
    a hang kills torchrun's workers too, not just torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "autobuild", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _why(out: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: the ranks' own error lines (a C++ abort names its
    exception before torchrun's summary), then the end of its output."""
    lines = [ln for ln in out.stderr.splitlines() if any(
        word in ln for word in ("Error", "error:", "terminate", "what()", "Exception"))]
    return "\n".join(lines[:20]) + "\n...\n" + out.stderr[-1500:]


def test_torchrun_two_processes(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    out = _torchrun(["train", "cifar_resnet20", "--data",
                     "synthetic:size=3x8x8,classes=4,train=64,val=20", "--epochs", "2",
                     "--batch-size", "8", "--device", "cpu", "--out", str(run),
                     "--no-progress"], timeout=150)
    assert out.returncode == 0, _why(out)
    assert out.stdout.count("best val top-1") == 1  # only rank 0 reports
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # 64 images, 2 ranks x 4 batches of 8 per epoch; val is sharded exactly, summed over ranks.
    assert all(float(r["val_top1"]) * 20 / 100 == round(float(r["val_top1"]) * 20 / 100)
               for r in rows)
    assert (run / "weights.safetensors").exists() and (run / "checkpoint.pt").exists()
    # Trained again in its own directory, on the data its record names: every rank reads
    # the record and the starting weights before rank 0 replaces the run (a barrier).
    out = _torchrun(["train", str(run), "--force", "--epochs", "1", "--batch-size", "8",
                     "--device", "cpu", "--no-progress"], timeout=150)
    assert out.returncode == 0, _why(out)
    with open(run / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert (run / "init.safetensors").exists()


def test_torchrun_darts_with_an_idle_tower(tmp_path: Path) -> None:
    """With --aux-weight 0 the tower's loss counts for nothing: DDP must still get every
    gradient it waits for (it failed: "Expected to have finished reduction in the prior
    iteration")."""
    out = _torchrun(["train", "cifar_darts_v2_aux", "--data",
                     "synthetic:size=3x32x32,classes=10,train=8,val=4", "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "darts"),
                     "--no-progress", "--aux-weight", "0", "--drop-path", "0.2", "--cutout",
                     "8"], timeout=300)
    assert out.returncode == 0, _why(out)


def test_torchrun_detection_evaluates_like_one_process(tmp_path: Path) -> None:
    """Two ranks train an SSDlite; the mAP they record (each rank scored its shard, rank 0
    pooled them in dataset order, with rank 0's BN statistics) is what one process measures
    on the saved weights."""
    run = tmp_path / "det"
    spec = "synthetic-detection:size=48,train=8,val=5"
    out = _torchrun(["train", "ssdlite320_mobilenet_v3_large", "--data", spec, "--image-size",
                     "48", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--out",
                     str(run), "--no-progress", "--workers", "0"], timeout=240)
    assert out.returncode == 0, _why(out)
    with open(run / "metrics.csv") as f:
        recorded = float(next(csv.DictReader(f))["map"])
    from autobuild.io import load
    from autobuild.train import evaluate_detection
    from autobuild.train.detection import prepare_detector

    model = prepare_detector(load(str(run)))
    result = evaluate_detection(model, spec, None)
    assert abs(result["map"] - recorded) <= 1e-6 * max(1.0, recorded)
