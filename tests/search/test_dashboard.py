"""`autobuild dashboard` serves a study: its trials and a trial's plan artifact through
optuna-dashboard's HTTP API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from autobuild.cli import main
from autobuild.search import load_space, run
from autobuild.search.dashboard import free_port
from tests.search.conftest import tiny_space

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_dashboard_serves_the_study_and_its_artifacts(in_tmp) -> None:
    study = run(load_space(tiny_space(n_trials=1, seeding={"baseline": True,
                                                           "all_converted": False})),
                quiet=True)
    trial = study.trials[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autobuild", "dashboard", "--study", "tiny",
                             "--port", str(port)], cwd=in_tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            # a job runner may start the tests with SIGINT ignored, which
                            # Python keeps: a terminal's Ctrl-C is what is tested
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.5)
        summary = next(s for s in studies if s["study_name"] == "tiny")
        assert summary["directions"] == ["maximize", "minimize"]
        detail = json.loads(_get(f"{base}/api/studies/{summary['study_id']}"))
        assert len(detail["trials"]) == 1
        assert detail["objective_names"] == ["top1", "macs"]
        served = detail["trials"][0]
        artifact = trial.user_attrs["plan_artifact"]
        body = _get(f"{base}/artifacts/{summary['study_id']}/{served['trial_id']}/{artifact}")
        assert b"autobuild_plan: 3" in body
        # Ctrl-C stops it as any interrupted command: exit 130 (the server's own handling
        # of the KeyboardInterrupt made it 0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "autobuild: interrupted" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def _refused(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert needle in err and err.count("\n") == 1 and not out, (out, err)


def test_a_taken_port_and_a_missing_artifact_directory_are_refused(in_tmp, capsys) -> None:
    optuna.create_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _refused(capsys, ["dashboard", "--study", "tiny", "--port", port],
                 f"--port {port}: 127.0.0.1:{port} is not free")
    _refused(capsys, ["dashboard", "--study", "tiny", "--artifacts", "/nonexistent/dir"],
             "--artifacts '/nonexistent/dir' does not exist")
    _refused(capsys, ["dashboard", "--study", "tiny", "--artifacts", "studies/tiny.db"],
             "is not a directory")


def test_an_unknown_study_is_refused_listing_those_there(in_tmp, capsys, postgres_url) -> None:
    optuna.create_study(study_name="tiny", storage=postgres_url)
    _refused(capsys, ["dashboard", "--storage", postgres_url, "--study", "nope"],
             "no study named 'nope' in postgresql+psycopg://")
    assert main(["dashboard", "--storage", postgres_url, "--study", "nope"]) == 2
    assert "studies there: tiny" in capsys.readouterr().err
