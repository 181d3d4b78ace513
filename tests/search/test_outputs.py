"""What `report` and `export` write never replaces a study: its database and its artifact
store (every trial's plan and kept weights) are refused as `--out DIR --force`, and an
export finds kept weights in the store `--artifacts` names, or says where it looked."""

from __future__ import annotations

import os

import optuna
import torch
import yaml

from autobuild.cli import main
from tests.search.conftest import tiny_space

#: One trained trial (the baseline), its weights kept.
ONE_TRIAL = {"n_trials": 1, "keep_weights": True,
             "seeding": {"baseline": True, "all_converted": False, "revert_top_ri": 0}}


def _search(in_tmp, capsys, *flags: str) -> None:
    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(**ONE_TRIAL)))
    assert main(["search", "space.yaml", "--quiet", *flags]) == 0
    capsys.readouterr()


def _refused(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def _listing(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_report_and_export_never_replace_the_study_or_its_artifacts(in_tmp, capsys) -> None:
    _search(in_tmp, capsys, "--artifacts", "art")
    studies, art = _listing(in_tmp / "studies"), _listing(in_tmp / "art")
    assert "tiny.db" in studies and art  # the plan and the weights
    export = ["export", "--study", "tiny", "--trial", "0", "--force"]
    _refused(capsys, [*export, "--out", "studies"],
             "studies/tiny.db', which this command must keep: replacing it whole")
    _refused(capsys, [*export, "--out", "art", "--artifacts", "art"],
             "art', which this command must keep: replacing it")
    # The store the study was created with is guarded without --artifacts, too.
    _refused(capsys, [*export, "--out", "art"],
             "art', which this command must keep: replacing it whole")
    _refused(capsys, ["report", "--study", "tiny", "--out", "art", "--force"],
             "art', which this command must keep: replacing it whole")
    # The default store (beside the database) is guarded whether or not the study used it.
    os.makedirs(in_tmp / "studies" / "tiny-artifacts" / "x")
    for command in (export, ["report", "--study", "tiny", "--force"]):
        _refused(capsys, [*command, "--out", "studies/tiny-artifacts"], "tiny-artifacts")
    assert _listing(in_tmp / "art") == art
    assert set(studies) <= set(_listing(in_tmp / "studies"))


def test_export_finds_kept_weights_where_artifacts_says(in_tmp, capsys) -> None:
    _search(in_tmp, capsys, "--artifacts", "art")
    export = ["export", "--study", "tiny", "--trial", "0", "--out", "best"]
    # Not where --artifacts says: one line naming where it looked and where the study's are.
    _refused(capsys, [*export, "--artifacts", "elsewhere"], "(the study was created with")
    # ...and so is one that is not a directory, when no weights were kept as well
    _refused(capsys, [*export, "--artifacts", "studies/tiny.db"], "is not a directory")
    assert not os.path.exists(in_tmp / "best")
    assert main([*export, "--artifacts", "art"]) == 0
    assert "plan + trained weights" in capsys.readouterr().out
    assert sorted(os.listdir(in_tmp / "best")) == ["plan.yaml", "weights.safetensors"]
    # Without --artifacts, the folder the study was created with.
    assert main(["export", "--study", "tiny", "--trial", "0", "--out", "best2"]) == 0
    assert "plan + trained weights" in capsys.readouterr().out


def _weights(study, trial) -> bytes:
    store = optuna.artifacts.FileSystemArtifactStore(f"studies/{study.study_name}-artifacts")
    with store.open_reader(trial.user_attrs["weights_artifact"]) as f:
        return f.read()


def test_a_single_worker_search_is_reproducible(in_tmp) -> None:
    """Each trial's network is built from the space's seed, whatever ran before it in the
    process (here: another global seed before each search), so two searches give the same
    weights and values, trial by trial."""
    from autobuild.search import load_space, run

    space = load_space(tiny_space(n_trials=3, keep_weights=True, budget={
        "epochs": 1, "batch_size": 16, "train_subset": 32}, seeding={
        "baseline": True, "all_converted": True, "revert_top_ri": 0}))
    studies = []
    for name, rng in (("first", 1), ("second", 2)):
        torch.manual_seed(rng)  # a process that drew other random numbers before
        studies.append(run(space, study_name=name, quiet=True))
    first, second = (s.get_trials(deepcopy=False) for s in studies)
    assert len(first) == len(second) >= 3
    for a, b in zip(first, second, strict=True):
        assert (a.state, a.params, a.values) == (b.state, b.params, b.values), a.number
        if "weights_artifact" in a.user_attrs:
            assert _weights(studies[0], a) == _weights(studies[1], b), a.number


def test_no_top1_for_a_failed_trial_and_no_eta_without_workers(in_tmp) -> None:
    from autobuild.search.report import trials_frame
    from autobuild.search.status import storage_status

    url = "sqlite:///studies/s.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("n_trials", 5)
    curve = {"top1_per_epoch": [40.0, 50.0]}
    study.add_trial(optuna.trial.create_trial(values=[50.0, 1.0], user_attrs=curve))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs=curve))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs=curve))  # interrupted mid-training
    assert trials_frame(study)["top1"].tolist()[:2] == [50.0, 50.0]
    assert trials_frame(study)["top1"].isna().tolist() == [False, False, True]
    (row,) = storage_status(url, "s")
    assert row["finished"] == 2 and row["workers_alive"] == [] and row["eta_s"] is None


def test_the_report_command_a_search_prints_works_as_printed(in_tmp, capsys) -> None:
    """The hint names the --storage the search used (without it, report looked in
    studies/ and found nothing)."""
    import shlex

    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(**ONE_TRIAL)))
    url = f"sqlite:///{in_tmp / 'elsewhere.db'}"
    assert main(["search", "space.yaml", "--quiet", "--storage", url]) == 0
    hint = capsys.readouterr().out.split("`")[1]
    assert hint == f"autobuild report --study tiny --storage {url}"
    assert main([*shlex.split(hint)[1:], "--out", "rep"]) == 0
    assert (in_tmp / "rep" / "report.md").exists()


def test_ri_csv_has_its_header_when_no_ri_was_measured(in_tmp, capsys) -> None:
    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(**ONE_TRIAL)))  # no RI
    assert main(["search", "space.yaml", "--quiet"]) == 0
    assert main(["report", "--study", "tiny", "--out", "rep"]) == 0
    assert (in_tmp / "rep" / "ri.csv").read_text().startswith("site,family,choice,")


def test_the_pareto_table_shows_the_cost_the_front_is_on(in_tmp, capsys) -> None:
    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(
        **{**ONE_TRIAL, "n_trials": 2}, objectives=["top1", "latency_ms"])))
    assert main(["search", "space.yaml", "--quiet"]) == 0
    assert main(["report", "--study", "tiny", "--out", "rep"]) == 0
    md = (in_tmp / "rep" / "report.md").read_text()
    assert "| trial | top-1 (%) | params | MACs | latency (ms) | vs baseline latency |" in md
    import optuna

    study = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    base = study.user_attrs["baseline"]["latency_ms"]
    assert study.best_trials
    for t in study.best_trials:
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {t.number} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[4] == f"{t.user_attrs['latency_ms']:.3g}"
        assert cells[5] == f"{t.user_attrs['latency_ms'] / base:.2f}x"  # not the MACs ratio
