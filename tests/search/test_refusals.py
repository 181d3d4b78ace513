"""Refused search and worker commands: one line, exit 2, naming what the user gave, and
nothing left behind (no study, no empty database file, no artifact directory, no trial
taken)."""

from __future__ import annotations

import os

import optuna
import pytest
import torch
import yaml

from autobuild.cli import main
from tests.search.conftest import tiny_space

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _space(in_tmp, **changes) -> str:
    (in_tmp / "space.yaml").write_text(yaml.safe_dump(tiny_space(**changes)))
    return "space.yaml"


def _refused(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--resume"], "no study 'zz' to resume"),
    # (named by the space's key: a shipped space run from outside the repository said only
    # that a folder it never named did not exist)
    (["--set", "data=imagefolder:/nonexistent"],
     "data 'imagefolder:/nonexistent': imagefolder:/nonexistent needs train/"),
    (["--set", "baseline=nosuchnet"], "unknown model 'nosuchnet'"),
    (["--set", "groups=[{sites: nope, choices: [quadratic]}]"], "matches no site"),
    (["--set", "groups=[{sites: layer1.0.conv1, choices: [nosuchfamily]}]"], "nosuchfamily"),
    (["--artifacts", "/proc/art"], "/proc/art"),
    (["--storage", "sqlite://"], "in-memory SQLite"),
    (["--storage", "sqlite:///"], "in-memory SQLite"),
    (["--storage", "sqlite:///:memory:"], "in-memory SQLite"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU", marks=NO_CUDA),
    pytest.param(["--set", "device=cuda:1"], "search space 'space.yaml': device cuda:1",
                 marks=NO_CUDA),
    (["--device", "mps"], "--device mps: MPS is not available"),
    # Found only when a trial built or trained, these used to leave a study (with a failed
    # trial, after training the baseline) that blocked the name.
    (["--set", "init=preserve", "--set", "groups=[{sites: layer1.*, choices: [multiplicative]}]"],
     "groups.0.choices: multiplicative: multiplicative does not support init 'preserve'"),
    (["--set", "budget.tensorboard=/proc/tb"],
     "search space 'space.yaml': budget.tensorboard '/proc/tb': cannot create folders in "
     "'/proc'"),
    # A choice that converts none of its sites made every trial the baseline.
    (["--set", "groups=[{sites: layer1.*.conv*, choices: [multiplicative]}]"],
     "groups.0.choices: multiplicative: converts none of the group's sites (layer1.0.conv1, "
     "layer1.0.conv2, layer1.1.conv1, ...): multiplicative takes block/network sites, these "
     "are conv"),
    # A family that takes conv sites, but not with these options (it said "dirac takes
    # network/conv sites, these are conv").
    (["--set", "groups=[{sites: layer1.*.conv*, choices: [dirac]}]"],
     "dirac:network takes none of these conv sites (`autobuild sites cifar_resnet20 --to "
     "dirac` lists those it takes; `autobuild variants dirac` lists its options)"),
    # Keys the search sets itself were accepted in the budget and ignored.
    (["--set", "budget.device=cuda"],
     "search space 'space.yaml': budget.device: the space's top-level"),
    (["--set", "budget.seed=3"],
     "search space 'space.yaml': budget.seed: the space's top-level `seed`"),
    (["--set", "budget.progress=true"],
     "search space 'space.yaml': budget.progress: trials train without"),
    (["--set", "device=tpu"], "search space 'space.yaml': device: must be auto, cpu"),
    # data_dir with data that does not read it: ignored by the search (and the train
    # command export printed for a trial was then refused)
    (["--set", "data_dir=/tmp"], "search space 'space.yaml': data_dir '/tmp': it is where "
                                 "CIFAR's batches are"),
    # Two groups of one name: exit 1 from Optuna once the first trial was taken.
    (["--set", "groups.1.name=stage3"], "groups: group 1's name 'stage3' is also group 0's"),
    # A site in two per-site groups: one parameter "site:NAME" asked with two choice lists.
    (["--set", "groups=[{sites: layer1.0.conv*, per_site: true, choices: [dirac:convs]}, "
               "{name: b, sites: layer1.*.conv1, per_site: true, choices: [quadratic]}]"],
     "groups.1.sites: site 'layer1.0.conv1' is also in per-site group 0"),
])
def test_a_refused_search_leaves_nothing_behind(in_tmp, capsys, flags, needle) -> None:
    if flags == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    _refused(capsys, ["search", _space(in_tmp), "--study", "zz", *flags], needle)
    assert os.listdir(in_tmp / "studies") == []


def test_a_refused_search_removes_the_nested_directories_it_made(in_tmp, capsys) -> None:
    _refused(capsys, ["search", _space(in_tmp), "--study", "zz", "--resume",
                      "--storage", "sqlite:///db/a/zz.db", "--artifacts", "art/b/c"],
             "no study 'zz' to resume")
    assert sorted(os.listdir(in_tmp)) == ["space.yaml", "studies"]


def test_a_database_that_holds_a_study_is_never_removed(in_tmp, capsys) -> None:
    """The clean-up removes only a file this command created and that holds no study."""
    space = _space(in_tmp, n_trials=1, seeding={"baseline": True, "all_converted": False,
                                                "revert_top_ri": 0})
    assert main(["search", space, "--quiet"]) == 0
    _refused(capsys, ["search", space, "--study", "zz", "--resume",
                      "--storage", "sqlite:///studies/tiny.db"], "no study 'zz' to resume")
    assert optuna.get_all_study_names("sqlite:///studies/tiny.db") == ["tiny"]


@pytest.mark.parametrize(("value", "key"), [
    ("n_trials=true", "n_trials"), ("budget.epochs=true", "budget.epochs"),
    ("budget.epochs=1.0", "budget.epochs"), ("seed=true", "seed"),
    ("pruning.enabled=1", "pruning.enabled"), ("keep_weights=1", "keep_weights"),
    ("pruning.margin=true", "pruning.margin"), ("seeding.revert_top_ri=1.0",
                                                 "seeding.revert_top_ri"),
    ("groups=[{sites: layer1.0.conv1, choices: [quadratic], per_site: 1}]",
     "groups.0.per_site"),
])
def test_space_values_are_never_converted_across_types(in_tmp, capsys, value, key) -> None:
    _refused(capsys, ["search", _space(in_tmp), "--set", value], f"{key}: must be a valid")
    assert os.listdir(in_tmp / "studies") == []


def test_a_directory_is_not_a_search_space(in_tmp, capsys) -> None:
    _refused(capsys, ["search", "studies"], "search space 'studies' is a directory")


def test_n_trials_has_an_upper_bound(in_tmp, capsys) -> None:
    _refused(capsys, ["search", _space(in_tmp), "--n-trials", "100001"],
             "--n-trials: must be less than or equal to 100000")


def test_importance_checks_its_run_before_its_data(in_tmp, capsys) -> None:
    _refused(capsys, ["importance", "runs/nonexistent"], "RUN 'runs/nonexistent' does not exist")
    (in_tmp / "afile").write_text("x")
    _refused(capsys, ["importance", "afile"], "RUN 'afile' is not a directory")


# ---- on PostgreSQL: an existing study, and workers ------------------------------------------
def _pg_study(in_tmp, url: str) -> str:
    """A study on PostgreSQL with its seed trials enqueued and none taken."""
    from autobuild.search import load_space, prepare

    prepare(load_space(tiny_space()), storage=url, join=True, quiet=True)
    return _space(in_tmp)


def _states(url: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name="tiny", storage=url).trials]


def test_a_worker_checks_its_device_before_taking_a_trial(in_tmp, capsys, postgres_url
                                                          ) -> None:
    _pg_study(in_tmp, postgres_url)
    waiting = _states(postgres_url)
    assert waiting and set(waiting) == {"WAITING"}
    devices = [] if torch.backends.mps.is_available() else ["mps"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    devices.append(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    for device in devices:
        _refused(capsys, ["worker", "--storage", postgres_url, "--study", "tiny",
                          "--device", device], f"--device {device}: ")
    assert _states(postgres_url) == waiting  # no trial taken, none failed


def test_an_existing_study_hears_of_the_device_and_of_the_flag_given(in_tmp, capsys,
                                                                    postgres_url) -> None:
    space = _pg_study(in_tmp, postgres_url)
    bad = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    _refused(capsys, ["search", space, "--storage", postgres_url, "--device", bad],
             f"--device {bad}: ")  # not "already exists"
    _refused(capsys, ["search", space, "--storage", postgres_url, "--join",
                      "--set", "budget.epochs=1"],
             "budget.epochs is 2 there, 1 here; --join continues a study with the space it "
             "was made from: give the values it was made with (--set budget.epochs=2)")
    assert set(_states(postgres_url)) == {"WAITING"}


def test_keys_the_search_sets_are_refused_for_new_studies_only() -> None:
    """A study made before budget.seed/device/progress were refused continues as made."""
    from autobuild.errors import AutobuildError
    from autobuild.search import load_space
    from autobuild.search.runner import _config

    space = load_space(tiny_space(budget={"epochs": 1, "batch_size": 8, "seed": 3}))
    with pytest.raises(AutobuildError, match="budget.seed"):
        _config(space, None)
    assert _config(space, None, new=False).seed == 0  # (the space's: as it always was)


def test_a_read_only_study_database_is_refused_before_any_work(in_tmp, capsys,
                                                               monkeypatch) -> None:
    """--resume on a database the user cannot write: exit 1 (Optuna's StorageInternalError
    from SQLite's "attempt to write a readonly database") after the baseline was analysed.
    (As root, os.access says yes to everything: the tests run as root in CI, so the
    permission is taken away by patching it.)"""
    space = _space(in_tmp, n_trials=1)
    assert main(["search", space, "--quiet"]) == 0
    database = os.path.abspath("studies/tiny.db")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (
        os.path.abspath(path) == database and mode & os.W_OK) and real(path, mode, **kw))
    _refused(capsys, ["search", space, "--resume", "--n-trials", "2"],
             f"study database '{database}' cannot be written (the file is read-only)")
    assert main(["status", "--study", "tiny"]) == 0  # reading it is fine
