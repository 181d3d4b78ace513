"""Many workers on a real PostgreSQL server, as separate processes: exact trial counts, no
placement trained twice, killed workers lose nothing, seeds enqueued once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import yaml

from autobuild.cli import main
from tests.search.conftest import tiny_space

ROOT = Path(__file__).resolve().parents[2]


def _space(tmp: Path, **changes) -> Path:
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(tiny_space(**changes)))
    return path


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autobuild", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "OMP_NUM_THREADS": "1"})


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=url)


def _check_complete(study: optuna.Study, n: int) -> None:
    states = Counter(t.state for t in study.trials)
    assert states[optuna.trial.TrialState.COMPLETE] + states[optuna.trial.TrialState.PRUNED] == n
    assert states[optuna.trial.TrialState.RUNNING] == 0
    trained = Counter(t.user_attrs["placement_key"] for t in study.trials
                      if t.user_attrs.get("trained") and "reused_from" not in t.user_attrs
                      and t.state != optuna.trial.TrialState.FAIL)
    assert trained and max(trained.values()) == 1, trained  # no placement trained twice


def test_three_workers_finish_a_twelve_trial_study(in_tmp, postgres_url) -> None:
    space = _space(in_tmp, n_trials=12, budget={"epochs": 1, "batch_size": 32})
    procs = [_start(["search", str(space), "--storage", postgres_url, "--join", "--quiet"],
                    in_tmp) for _ in range(3)]
    _finish(procs)
    study = _study(postgres_url)
    _check_complete(study, 12)
    workers = {t.user_attrs.get("worker") for t in study.trials if t.user_attrs.get("trained")}
    assert len(workers) >= 2  # the work was shared


def test_five_workers_started_at_once_enqueue_the_seeds_once(in_tmp, postgres_url) -> None:
    space = _space(in_tmp, n_trials=3, budget={"epochs": 1, "batch_size": 32})
    procs = [_start(["search", str(space), "--storage", postgres_url, "--join", "--quiet"],
                    in_tmp) for _ in range(5)]
    _finish(procs)
    study = _study(postgres_url)
    seeds = Counter(t.user_attrs.get("seed_kind") for t in study.trials
                    if "requeued_from" not in t.user_attrs and "failed_trial" not in
                    t.system_attrs)
    assert seeds["baseline"] == 1 and seeds["all_converted"] == 1
    _check_complete(study, 3)


def test_a_killed_worker_loses_nothing(in_tmp, postgres_url) -> None:
    space = _space(in_tmp, n_trials=4, budget={"epochs": 8, "batch_size": 8})
    beat = ["--heartbeat", "1", "--grace", "4"]
    victim = _start(["search", str(space), "--storage", postgres_url, *beat], in_tmp)
    for line in victim.stderr:  # SIGKILL in the middle of the first trial's training
        if "epoch 1/8" in line:
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    time.sleep(5)  # its heartbeat goes stale
    assert main(["status", "--storage", postgres_url, "--study", "tiny", "--json"]) == 0
    study = _study(postgres_url)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1  # status failed the stale trial...
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.WAITING  # ...re-queued
    _finish([_start(["worker", "--storage", postgres_url, "--study", "tiny", "--quiet", *beat],
                    in_tmp)])
    study = _study(postgres_url)
    _check_complete(study, 4)
    assert study.trials[retries[0].number].params == failed[0].params


def test_sqlite_takes_one_worker(in_tmp, capsys) -> None:
    space = _space(in_tmp, n_trials=1)
    assert main(["search", str(space), "--join", "--storage", "sqlite:///studies/t.db"]) == 2
    assert "SQLite takes one worker" in capsys.readouterr().err
    assert main(["worker", "--storage", "sqlite:///studies/t.db", "--study", "tiny"]) == 2
    assert "use PostgreSQL" in capsys.readouterr().err
