"""A real (tiny) study on SQLite: attributes, seeding, reuse, constraints, reports, export,
resume, errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.search import load_space, run
from autobuild.search.export import export_trial
from autobuild.search.report import failure_reason, pareto_trials, trials_frame, write_report
from autobuild.search.status import study_status
from autobuild.train import DivergedError
from tests.search.conftest import tiny_space

ROOT = Path(__file__).resolve().parents[2]


def _trials(study):
    return study.get_trials(deepcopy=False)


def test_a_four_trial_study_records_everything(in_tmp) -> None:
    study = run(load_space(tiny_space()), quiet=True)
    trials = _trials(study)
    assert len([t for t in trials if t.state.is_finished()]) == 4
    assert study.metric_names == ["top1", "macs"]
    kinds = [t.user_attrs.get("seed_kind") for t in trials]
    assert kinds[:3] == ["baseline", "all_converted", "revert_top_ri_1"]
    assert study.user_attrs["ri"] and {"site", "ri"} <= set(study.user_attrs["ri"][0])
    for t in trials:
        a = t.user_attrs
        for key in ("placement_key", "placement", "params", "macs", "flops", "seed", "device",
                    "plan_artifact", "constraints", "feasible", "trained"):
            assert key in a, (t.number, key)
        if a["trained"]:
            assert len(a["top1_per_epoch"]) <= 2 and "wall_time_s" in a
    base = trials[0]
    assert base.user_attrs["placement"] == "baseline" and base.values[1] == base.user_attrs["macs"]
    store = optuna.artifacts.FileSystemArtifactStore("studies/tiny-artifacts")
    with store.open_reader(trials[1].user_attrs["plan_artifact"]) as f:
        plan = f.read().decode()
    assert "autobuild_plan: 3" in plan and "pde-global" in plan


def test_identical_placements_are_trained_once(in_tmp) -> None:
    space = load_space(tiny_space(seeding={"baseline": True, "all_converted": True,
                                           "revert_top_ri": 0}, n_trials=3))
    from autobuild.search import prepare

    search = prepare(space, quiet=True)
    search.study.enqueue_trial({"stage3": "keep", "convs": "keep"})  # = the baseline seed
    from autobuild.search.runner import work

    work(search, 3)
    trials = _trials(search.study)
    assert trials[2].user_attrs["reused_from"] == 0
    assert trials[2].values == trials[0].values
    assert "top1_per_epoch" in trials[2].user_attrs  # the record is carried over
    # ...but not the source's training time, and the report writes trial numbers as such
    assert trials[2].user_attrs["wall_time_s"] < trials[0].user_attrs["wall_time_s"]
    from autobuild.search import write_report

    write_report(search.study, "rep")
    import csv

    with open("rep/trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["reused_from"] for r in rows] == ["", "", "0"]
    assert rows[0]["macs"] == str(trials[0].user_attrs["macs"])


def test_a_placement_over_a_constraint_is_never_trained(in_tmp) -> None:
    space = load_space(tiny_space(constraints=["macs <= 1.1 * baseline"], n_trials=2,
                                  groups=[{"name": "convs", "sites": "layer*.*.conv*",
                                           "choices": ["keep", "quadratic:ours"]}]))
    study = run(space, quiet=True)
    converted = _trials(study)[1]
    assert converted.user_attrs["seed_kind"] == "all_converted"
    assert converted.user_attrs["trained"] is False and converted.user_attrs["feasible"] is False
    assert "top1_per_epoch" not in converted.user_attrs
    assert converted.user_attrs["constraints"]["macs <= 1.1 * baseline"] > 0
    assert converted.number not in {t.number for t in pareto_trials(study)}
    # exported, it is not said to have trained (the message gave "the weights it trained from")
    result = export_trial(study, converted.number, str(in_tmp / "never"))
    assert result["never_trained"] and not result["trained_weights"]
    # no RI without a trained all-converted network: said, not an empty ri.csv alone
    assert "over a constraint" in converted.user_attrs["ri_error"]
    write_report(study, str(in_tmp / "rep"))
    assert "RI: not measured, so no revert seeds (the all-converted network is over a " \
        "constraint" in (in_tmp / "rep" / "report.md").read_text()


def test_a_trial_stopped_early_is_recorded_as_trained(in_tmp, monkeypatch) -> None:
    """A pruned trial trained for the epochs it had: trials.csv showed `trained` empty."""
    from autobuild.search.objective import Objective

    def stopped(self, trial, model, placement, costs):  # as _train ends a dominated trial
        trial.set_user_attr("top1_per_epoch", [10.0])
        raise optuna.TrialPruned("dominated at epoch 1")

    monkeypatch.setattr(Objective, "_train", stopped)
    study = run(load_space(tiny_space(n_trials=1, seeding={"all_converted": False})),
                quiet=True)
    (trial,) = _trials(study)
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["trained"] is True and trial.user_attrs["wall_time_s"] > 0
    assert trials_frame(study)["trained"].tolist() == [True]


def test_report_export_and_resume_through_the_cli(in_tmp, capsys) -> None:
    space = in_tmp / "space.yaml"
    import yaml

    space.write_text(yaml.safe_dump(tiny_space(n_trials=3)))
    assert main(["search", str(space), "--quiet"]) == 0
    assert main(["search", str(space), "--quiet"]) == 2  # exists: --resume or a new --study
    assert "--resume" in capsys.readouterr().err
    assert main(["search", str(space), "--resume", "--n-trials", "4", "--quiet"]) == 0
    capsys.readouterr()
    # fewer trials than it has: that lowered the study's target silently (status: 4/2)
    assert main(["search", str(space), "--resume", "--n-trials", "2", "--quiet"]) == 2
    assert "--n-trials 2: study 'tiny' already has 4 finished trials" in \
        capsys.readouterr().err
    assert main(["report", "--study", "tiny", "--out", "rep", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trials"] == 4 and result["hypervolume"] >= 0
    for name in ("trials.csv", "report.md", "pareto.png", "ri.csv"):
        assert (in_tmp / "rep" / name).stat().st_size > 0
    import matplotlib.image

    png = in_tmp / "rep" / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(png)).shape[2] in (3, 4)
    assert "## Pareto front" in (in_tmp / "rep" / "report.md").read_text()
    # A report is never written over files silently; --force replaces the directory whole.
    (in_tmp / "rep" / "notes.md").write_text("mine")
    assert main(["report", "--study", "tiny", "--out", "rep"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (in_tmp / "rep" / "notes.md").read_text() == "mine"
    assert main(["report", "--study", "tiny", "--out", "studies", "--force"]) == 2
    # not the study
    assert "studies/tiny.db', which this command must keep: replacing it whole" in \
        capsys.readouterr().err
    # ...and --force does not delete the user's notes with it
    assert main(["report", "--study", "tiny", "--out", "rep", "--force"]) == 2
    assert "also holds what autobuild did not write (notes.md)" in capsys.readouterr().err
    (in_tmp / "rep" / "notes.md").unlink()
    (in_tmp / "rep" / "ri.csv").unlink()  # a report of its own, older: replaced whole
    assert main(["report", "--study", "tiny", "--out", "rep", "--force", "--json"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(in_tmp / "rep")) == ["pareto.png", "report.md", "ri.csv",
                                                   "trials.csv"]
    assert main(["export", "--study", "tiny", "--trial", "1", "--out", "best"]) == 0
    assert "the initial weights it trained from (seed 0)" in capsys.readouterr().out
    assert sorted(os.listdir(in_tmp / "best")) == ["plan.yaml", "weights.safetensors"]
    assert main(["inspect", "best", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["placement"].startswith(("parameter-free",
                                                                        "pde-global",
                                                                        "quadratic"))


@pytest.mark.parametrize("argv,needle", [
    (["report", "--study", "nope"], "no study database"),
    (["report", "--study", "nope", "--storage", "sqlite:///studies/x.db"],
     "no study database 'studies/x.db'"),  # not created empty by a command that only reads
    (["search", "missing.yaml"], "does not exist"),
    (["search", "space.yaml", "--storage", "postgresql+psycopg://u:secret@127.0.0.1:1/x"],
     "cannot open storage postgresql+psycopg://u:***@127.0.0.1:1/x"),
    (["search", "space.yaml", "--storage", "nonsense"], "must be a database URL"),
    (["search", "space.yaml", "--resume"], "no study 'tiny' to resume"),
    (["search", "space.yaml", "--n-trials", "0"], "--n-trials: must be greater than or equal to 1"),
    (["export", "--study", "tiny", "--trial", "9", "--out", "x"], "has no trial 9"),
])
def test_errors_are_one_line(in_tmp, capsys, argv, needle) -> None:
    import yaml

    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(n_trials=1)))
    if argv[0] == "export":
        assert main(["search", "space.yaml", "--quiet"]) == 0
        capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "secret" not in err


def test_a_study_from_another_space_is_not_mixed(in_tmp) -> None:
    run(load_space(tiny_space(n_trials=1)), quiet=True)
    other = load_space(tiny_space(n_trials=1, budget={"epochs": 1, "batch_size": 32,
                                                      "cutout": 2}))
    # It names the keys that differ and the --set flags that give the study's values (a
    # study made with --set overrides is continued with the same ones).
    with pytest.raises(AutobuildError, match=r"made from another search space: budget.cutout "
                                             r"is not set there, 2 here; budget.epochs is 2 "
                                             r"there, 1 here; .*\(remove budget.cutout from "
                                             r"the space file, --set budget.epochs=2\)"):
        run(other, resume=True, quiet=True)


def test_nothing_to_search_is_refused(in_tmp) -> None:
    with pytest.raises(AutobuildError, match="groups.0.choices: nothing to choose besides keep"):
        run(load_space(tiny_space(groups=[{"sites": "layer1.0.conv1", "choices": ["keep"]}])),
            quiet=True)
    with pytest.raises(AutobuildError, match="matches no site"):
        run(load_space(tiny_space(groups=[{"sites": "nope*", "choices": ["quadratic"]}])),
            quiet=True)


def test_ctrl_c_stops_cleanly_and_resume_finishes(in_tmp) -> None:
    import yaml

    space = in_tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(n_trials=3, budget={"epochs": 6,
                                                                     "batch_size": 8})))
    cmd = [sys.executable, "-m", "autobuild", "search", str(space)]
    # A job runner may start the tests with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: give the child the default disposition, as in a terminal.
    proc = subprocess.Popen(cmd, cwd=in_tmp, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # interrupt in the middle of the first trial's training
        if "epoch 1/6" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING in states  # the interrupted trial is queued again
    assert main(["search", str(space), "--resume", "--quiet"]) == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    done = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(done) == 3
    again = [t for t in done if t.user_attrs.get("requeued_from") == 0]
    assert again and again[0].user_attrs["seed_kind"] == "baseline"  # the seed was trained
    assert failure_reason(study.trials[0], study.trials) == (
        f"interrupted (Ctrl-C or SIGTERM); re-queued as trial {again[0].number}")


def test_a_killed_sqlite_worker_is_known_dead_at_once(in_tmp, capsys) -> None:
    """kill -9 of the only worker: its running trial is seen as dead (its process on this
    machine is gone) by `status` and `--resume` right away; `--resume` was refused ("being
    worked on by HOST:PID ... use PostgreSQL") until the 60 s grace period had passed."""
    import json

    import yaml

    space = in_tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(n_trials=2, budget={"epochs": 6,
                                                                     "batch_size": 8})))
    proc = subprocess.Popen([sys.executable, "-m", "autobuild", "search", str(space)],
                            cwd=in_tmp, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stderr:  # killed in the middle of the first trial's training
        if "epoch 1/6" in line:
            break
    proc.kill()
    proc.communicate(timeout=60)
    capsys.readouterr()
    assert main(["status", "--study", "tiny", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["workers_alive"] == []
    assert main(["search", str(space), "--resume", "--quiet"]) == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    (killed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == killed.params
    assert main(["status", "--study", "tiny"]) == 0
    assert (f"tiny: trial {killed.number} failed: its worker died or stopped its heartbeat; "
            f"retried as trial {retried[0].number}") in capsys.readouterr().out


def test_a_worker_of_another_pid_namespace_is_not_judged_by_its_pid(in_tmp) -> None:
    """Containers sharing a host name (host networking) have PID namespaces of their own: a
    worker's pid looked up in another namespace would take a live worker for dead."""
    import socket

    from autobuild.search.study import PID_NAMESPACE_KEY, _died_here, pid_namespace

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study = optuna.create_study(storage=f"sqlite:///{in_tmp}/ns.db")
    worker = f"{socket.gethostname()}:{gone.pid}"
    for namespace, dead in ((pid_namespace(), True), ("4026531836x", False)):
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        trial.set_user_attr(PID_NAMESPACE_KEY, namespace)
        assert _died_here(study, study.trials[trial.number]) is dead


def test_diverging_trials_fail_with_their_reason_and_the_study_goes_on(in_tmp) -> None:
    space = load_space(tiny_space(n_trials=1, budget={"epochs": 1, "batch_size": 32,
                                                      "lr": 1000.0, "clip_grad": 0}))
    with pytest.raises(DivergedError, match="trials diverged") as info:
        run(space, quiet=True)
    assert info.value.exit_code == 3  # (the input was valid: not 2)
    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) >= 2  # the study went on after the first failure
    assert all("diverged" in t.user_attrs["fail_reason"] for t in failed)
    # ... and says why, where a user looks: the report's trials.csv and `status`
    frame = trials_frame(study)
    assert all("diverged" in r for r in frame[frame.state == "FAIL"]["fail_reason"])
    reasons = study_status(study)["failed"]
    assert len(reasons) == len(failed) and all("diverged" in r for r in reasons.values())


def test_revert_seeds_are_distinct_placements(in_tmp) -> None:
    # "convs" is one decision for all its sites: reverting its second-ranked site after
    # its first would repeat the same placement, so the seeds skip to the next decision.
    study = run(load_space(tiny_space(seeding={"revert_top_ri": 3}, n_trials=4)), quiet=True)
    trials = _trials(study)
    seeds = [t for t in trials if t.user_attrs.get("seed_kind", "").startswith("revert")]
    keys = [t.user_attrs["placement_key"] for t in trials
            if t.user_attrs.get("seed_kind") in ("all_converted", *(
                s.user_attrs["seed_kind"] for s in seeds))]
    assert seeds and len(keys) == len(set(keys))
    # two decisions (stage3, convs): reverting both would be the baseline, already a seed
    assert len(seeds) == 1 and seeds[0].user_attrs["placement"] != "baseline"


def test_the_front_lists_a_reused_placement_once(in_tmp) -> None:
    from autobuild.search import prepare
    from autobuild.search.runner import work

    space = load_space(tiny_space(seeding={"baseline": True, "all_converted": False,
                                           "revert_top_ri": 0}, n_trials=2))
    search = prepare(space, quiet=True)
    search.study.enqueue_trial({"stage3": "keep", "convs": "keep"})  # the baseline again
    work(search, 2)
    trials = _trials(search.study)
    assert trials[1].user_attrs["reused_from"] == 0
    assert "seed_kind" not in trials[1].user_attrs  # the result is reused, not the reason
    assert [t.number for t in pareto_trials(search.study)] == [0]


def test_joining_and_resuming_samplers_do_not_replay_the_creators_proposals(monkeypatch) -> None:
    from types import SimpleNamespace

    from autobuild.search import runner

    space = load_space(tiny_space())
    study = SimpleNamespace(get_trials=lambda deepcopy=False: [None] * 5)
    assert runner._sampler_seed(space, study, created=True, join=False) == space.seed
    resumed = runner._sampler_seed(space, study, created=False, join=False)
    assert resumed != space.seed  # a resumed random sampler would re-propose trial 0, 1, ...
    assert resumed == runner._sampler_seed(space, study, created=False, join=False)
    monkeypatch.setattr(runner.os, "getpid", lambda: 1000)
    first = runner._sampler_seed(space, study, created=False, join=True)
    monkeypatch.setattr(runner.os, "getpid", lambda: 1001)
    assert runner._sampler_seed(space, study, created=False, join=True) != first


def test_a_trial_waits_for_an_earlier_one_that_has_not_named_its_placement(monkeypatch) -> None:
    # Two workers start trials 0 and 1 with one placement. Trial 1 names it first: deciding
    # then would let both train (trial 0 later sees only a *higher* trial with its key).
    # Trial 1 must wait until trial 0 has named its placement, then reuse trial 0's result.
    import threading

    from autobuild.search import objective as objective_module

    monkeypatch.setattr(objective_module, "REUSE_POLL_S", 0.05)
    study = optuna.create_study(directions=["maximize", "minimize"])
    low, high = study.ask(), study.ask()
    high.set_user_attr(objective_module.ATTR_KEY, "K")
    waiter = objective_module.Objective.__new__(objective_module.Objective)
    waiter.quiet, waiter.keyless_seen = True, {}
    result: list = []
    thread = threading.Thread(target=lambda: result.append(waiter._reuse(high, "K")))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # trial 0 has no key yet: trial 1 does not decide
    low.set_user_attr(objective_module.ATTR_KEY, "K")
    time.sleep(0.3)
    assert thread.is_alive()  # trial 0 trains this placement: trial 1 waits for its result
    study.tell(low, [50.0, 1e6])
    thread.join(timeout=5)
    assert result == [(50.0, 1e6)]
    assert study.trials[1].user_attrs["reused_from"] == 0


def test_a_keyless_trial_is_waited_for_a_bounded_time(monkeypatch) -> None:
    from autobuild.search import objective as objective_module

    monkeypatch.setattr(objective_module, "REUSE_POLL_S", 0.05)
    monkeypatch.setattr(objective_module, "KEYLESS_WAIT_S", 0.3)
    study = optuna.create_study()
    study.ask()  # a worker that died before naming its placement
    mine = study.ask()
    mine.set_user_attr(objective_module.ATTR_KEY, "K")
    waiter = objective_module.Objective.__new__(objective_module.Objective)
    waiter.quiet, waiter.keyless_seen = True, {}
    start = time.monotonic()
    assert waiter._reuse(mine, "K") is None  # nothing to reuse: this trial trains
    assert 0.3 <= time.monotonic() - start < 3
    # The worker's next trial does not wait for the silent one again.
    later = study.ask()
    later.set_user_attr(objective_module.ATTR_KEY, "L")
    start = time.monotonic()
    assert waiter._reuse(later, "L") is None
    assert time.monotonic() - start < 0.3


@pytest.mark.parametrize("baseline", ["cifar_resnet20", "regnet_x_400mf"])  # (no meta build)
def test_a_budget_the_baseline_cannot_take_is_refused_before_the_study(in_tmp, capsys,
                                                                       baseline) -> None:
    import yaml

    space = in_tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(baseline=baseline,
                                               budget={"epochs": 1, "drop_path": 0.2})))
    assert main(["search", str(space), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "budget.drop_path 0.2" in err and "no drop path" in err
    assert not os.listdir(in_tmp / "studies")  # no study, no database, no artifacts


@pytest.mark.parametrize(("budget", "needle"), [
    ({"cutout": -1}, "space.yaml': budget.cutout: must be greater than or equal to 0"),
    ({"lr": 0}, "space.yaml': budget.lr: must be greater than 0"),
])
def test_a_bad_budget_value_names_the_space_key(in_tmp, capsys, budget, needle) -> None:
    import yaml

    space = in_tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(budget={"epochs": 1, **budget})))
    assert main(["search", str(space), "--quiet"]) == 2
    assert needle in capsys.readouterr().err
    assert not os.listdir(in_tmp / "studies")


def test_a_space_with_model_args_trains_and_exports_them(in_tmp, capsys) -> None:
    """The baseline's builder arguments reach every trial's network and the exported plan."""
    pytest.importorskip("timm")
    import yaml

    from autobuild import load, plan_of

    space = in_tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(
        baseline="timm:test_efficientnet", model_args={"drop_path_rate": 0.2},
        data="synthetic:size=3x32x32,classes=4,train=32,val=16", n_trials=1,
        budget={"epochs": 1, "batch_size": 16}, seeding={"revert_top_ri": 0},
        groups=[{"name": "head", "sites": "conv_head", "choices": ["keep", "quadratic"]}])))
    assert main(["search", str(space), "--quiet"]) == 0
    assert main(["export", "--study", "tiny", "--trial", "0", "--out", "best"]) == 0
    model = load(str(in_tmp / "best"))
    assert plan_of(model).model_args == {"drop_path_rate": 0.2}
    assert sum(type(m).__name__ == "DropPath" for m in model.modules()) == 4


def test_an_interrupted_ri_step_is_measured_again(in_tmp, monkeypatch) -> None:
    """RI runs inside the all-converted trial: a worker stopped there (here Ctrl-C, for a
    SIGKILL the heartbeat) leaves the trial to be trained again, RI and seeds included."""
    from autobuild.search import seeding

    real = seeding.revert_top_ri

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(seeding, "revert_top_ri", interrupted)
    space = load_space(tiny_space())
    with pytest.raises(KeyboardInterrupt):
        run(space, quiet=True)
    study = optuna.load_study(study_name=space.name, storage=f"sqlite:///studies/{space.name}.db")
    assert "ri" not in study.user_attrs
    monkeypatch.setattr(seeding, "revert_top_ri", real)
    study = run(space, resume=True, quiet=True)
    assert study.user_attrs["ri"]
    complete = optuna.trial.TrialState.COMPLETE
    kinds = [t.user_attrs.get("seed_kind") for t in _trials(study) if t.state == complete]
    assert kinds.count("all_converted") == 1 and "revert_top_ri_1" in kinds


def test_reverts_queued_before_an_interrupt_are_not_queued_twice(in_tmp, monkeypatch) -> None:
    real = optuna.Study.set_user_attr
    calls = []

    def stop_at_ri(self, key, value):  # the reverts are queued; the RI is not recorded
        if key == "ri" and not calls:
            calls.append(key)
            raise KeyboardInterrupt
        return real(self, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", stop_at_ri)
    space = load_space(tiny_space())
    with pytest.raises(KeyboardInterrupt):
        run(space, quiet=True)
    study = run(space, resume=True, quiet=True)
    assert study.user_attrs["ri"]
    kinds = [t.user_attrs.get("seed_kind") for t in _trials(study)]
    assert kinds.count("revert_top_ri_1") == 1, kinds


def test_ri_is_measured_after_importance_epochs_without_changing_the_trial(
        in_tmp, monkeypatch) -> None:
    """``seeding.importance_epochs``: the RI (and the reverts) come after that many epochs of
    the all-converted trial, which then trains on exactly as if it had not been measured."""
    import importlib

    import torch
    from safetensors.torch import load_file

    importance_module = importlib.import_module("autobuild.search.importance")
    real, epochs_seen = importance_module.importance, []

    def spy(model, data, **kwargs):
        storage = f"sqlite:///studies/{name}.db"
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        converted = next(t for t in trials if t.user_attrs.get("seed_kind") == "all_converted")
        epochs_seen.append(len(converted.user_attrs["top1_per_epoch"]))
        return real(model, data, **kwargs)

    monkeypatch.setattr(importance_module, "importance", spy)
    weights = []
    for name, at in (("early", 1), ("late", 5)):
        # cutout draws from the global RNG in epoch 2, after the RI of "early" was measured
        space = load_space(tiny_space(
            name=name, n_trials=2, keep_weights=True,
            budget={"epochs": 2, "batch_size": 32, "cutout": 4},
            seeding={"revert_top_ri": 1, "importance_epochs": at}))
        study = run(space, quiet=True)
        assert study.user_attrs["ri"]
        converted = next(t for t in _trials(study)
                         if t.user_attrs.get("seed_kind") == "all_converted")
        artifact = in_tmp / "studies" / f"{name}-artifacts" / converted.user_attrs[
            "weights_artifact"]
        weights.append(load_file(str(artifact)))
    assert epochs_seen == [1, 2]  # after epoch 1; at the end when the trial trains fewer
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_failing_ri_step_keeps_the_trial_and_says_why(in_tmp, monkeypatch) -> None:
    import importlib

    importance_module = importlib.import_module("autobuild.search.importance")

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("masked forward failed\nsecond line")

    monkeypatch.setattr(importance_module, "importance", broken)
    study = run(load_space(tiny_space(n_trials=3)), quiet=True)
    assert "ri" not in study.user_attrs
    trials = _trials(study)
    converted = next(t for t in trials if t.user_attrs.get("seed_kind") == "all_converted")
    assert converted.state == optuna.trial.TrialState.COMPLETE
    assert converted.user_attrs["ri_error"] == "RuntimeError: masked forward failed"
    assert len(converted.user_attrs["top1_per_epoch"]) == 2 and len(calls) == 1
    assert not any(str(t.user_attrs.get("seed_kind")).startswith("revert") for t in trials)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without CUDA")
def test_a_trial_records_where_it_trained_not_the_setting(in_tmp) -> None:
    """`device: auto` was recorded as 'auto': with several GPUs nobody could tell."""
    study = run(load_space(tiny_space(device="auto", n_trials=1)), quiet=True)
    assert study.trials[0].user_attrs["device"] == "cpu"
