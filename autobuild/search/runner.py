"""Running a search: build the data and the analysis once, create (or continue) the study,
enqueue its seed trials, then run trials until the study holds ``n_trials`` finished ones."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from pydantic import ValidationError

from autobuild.errors import AutobuildError, in_context, schema_error
from autobuild.search.checks import (
    another_space,
    check_budget,
    check_data_dir,
    check_new_space,
    undone_on_refusal,
)
from autobuild.search.objective import Objective
from autobuild.search.report import pareto_trials
from autobuild.search.seeding import seed_params
from autobuild.search.space import SearchSpace, load_space
from autobuild.search.study import (
    artifact_dir,
    check_url,
    check_writable,
    default_storage,
    fail_dead_trials,
    finished,
    load_study,
    mask_url,
    open_storage,
    running_elsewhere,
    wait_for_others,
)
from autobuild.train.devices import check_device, check_sync_bn

__all__ = ["SQLITE_ONE_WORKER", "Search", "attach", "prepare", "run", "run_worker", "work"]


@dataclass
class Search:
    """Everything a worker needs: the space, its study, and the objective."""

    space: SearchSpace
    study: optuna.Study
    objective: Objective
    storage_url: str
    artifacts: str


def _sampler(space: SearchSpace, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = space.seed if seed is None else seed
    s = space.sampler
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    # Optuna's default: TPE for one objective, NSGA-II for several.
    return (optuna.samplers.TPESampler(seed=seed) if len(space.objectives) == 1
            else optuna.samplers.NSGAIISampler(seed=seed))


def _sampler_seed(space: SearchSpace, study: optuna.Study, created: bool, join: bool) -> int:
    """The space's seed for the process that created the study. A sampler with the same seed
    proposes the same placements again (which the search would only reuse), so a resumed
    study seeds from how far it got (reproducible) and each joining worker from its process
    as well (workers cannot be reproducible: they race)."""
    if created:
        return space.seed
    key = f"{space.seed}:{len(study.get_trials(deepcopy=False))}"
    if join:
        key += f":{socket.gethostname()}:{os.getpid()}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")


def _config(space: SearchSpace, device: str | None, new: bool = True) -> Any:
    from autobuild.train import TrainConfig

    known = set(TrainConfig.field_names())
    extra = {k: v for k, v in space.budget.model_dump().items()
             if k not in ("train_subset", "image_size")}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise AutobuildError(f"{space.key('budget.')}{unknown[0]}: unknown key; valid: "
                             f"{', '.join(sorted(known | {'train_subset', 'image_size'}))}")
    # Keys the search sets itself: taken from the budget, they would be ignored silently
    # (a study made before this was refused continues as it was made).
    for key, where in _SET_BY_SEARCH.items() if new else ():
        if key in extra:
            raise AutobuildError(f"{space.key('budget.')}{key}: {where}")
    if not device:  # (named as the space's key, not as a budget's)
        TrainConfig.from_space({"device": space.device}, space.key(), "")
    return TrainConfig.from_space({**extra, "seed": space.seed,
                                   "device": device or space.device, "progress": False},
                                  space.key(), "budget")


_SET_BY_SEARCH = {
    "seed": "the space's top-level `seed` seeds every trial (and the sampler); set it there",
    "device": "the space's top-level `device` (or --device) is where trials train; set it "
              "there",
    "progress": "trials train without progress bars (the search prints one line per trial)",
}


def prepare(space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
            resume: bool = False, join: bool = False, device: str | None = None,
            quiet: bool = False, artifacts: str | None = None,
            heartbeat: tuple[int, int] | None = None) -> Search:
    """Open the storage, create the study (``resume``: continue an existing one made from
    the same space; ``join``: create it unless another process has, then work on it) and
    the objective. Nothing is trained. Everything that can be checked without the database
    (the recipe, the device, the data, the baseline, the groups, the artifact directory) is
    checked before it is opened, and a refused command removes the database file and the
    artifact directory it created itself."""
    from autobuild.api import analyze
    from autobuild.train import build_data
    from autobuild.train.config import check_new_recipe
    from autobuild.train.tensorboard import check_log_dir

    name = study_name or space.name
    url = storage or default_storage(name)
    check_url(url)
    check_writable(url)
    if join and url.startswith("sqlite"):
        raise AutobuildError(SQLITE_ONE_WORKER)
    new = not (resume or join)  # (a study an older version made continues as it was made)
    config = _config(space, device, new)
    check_device(str(config.device), "--device" if device else space.key("device"))
    check_sync_bn(config, space.key("budget.sync_bn"))
    check_budget(space, config)
    if new:
        check_new_recipe(config, space.key("budget."), given=space.budget.model_dump())
        check_new_space(space)
        check_data_dir(space)
    check_log_dir(config.tensorboard, space.key("budget.tensorboard"))
    # (a study made before image_size was refused on other data goes on without it)
    size = space.budget.image_size if new or space.data.startswith("imagefolder:") else None
    try:
        data = build_data(space.data, space.data_dir, image_size=size,
                          train_subset=space.budget.train_subset,
                          subset_key=space.key("budget.train_subset"),
                          size_key=space.key("budget.image_size"))
    except AutobuildError as exc:  # (one about a budget key names it already)
        if space.key("budget.") in str(exc):
            raise
        scheme, _, path = space.data.partition(":")
        hint = (" (a relative path in a space is read from the directory autobuild runs in)"
                if scheme in ("imagefolder", "voc", "coco") and path
                and not os.path.isabs(path) else "")
        raise in_context(exc, f"{space.key('data')} {space.data!r}: {exc}{hint}") from exc
    from autobuild.train.regularize import check_regularizers

    # Regularisers the images cannot take (a cutout larger than them), before the study
    # exists: refused in the first trial, they left a study that blocked the corrected run.
    check_regularizers(None, config, key=space.key("budget."),
                       image_size=data.input_size[1:])
    torch.manual_seed(space.seed)  # the baseline's weights: every trial's kept layers
    analysis = analyze(space.baseline, num_classes=space.num_classes or data.num_classes,
                       input_size=space.input_size or data.input_size,
                       model_args=space.model_args)
    folder = artifact_dir(url, name, artifacts)
    with undone_on_refusal(url, folder):
        objective = Objective(space, analysis, data, config, new_study=new,
                              artifact_store=artifact_store(folder), quiet=quiet)
        store = open_storage(url, heartbeat=heartbeat)
        study, created = _open_study(space, name, store, url, (objective, folder), config,
                                     resume=resume, join=join)
    if heartbeat is not None:  # `status` judges staleness with the workers' grace period
        study.set_user_attr("heartbeat", list(heartbeat))
    study.sampler = _sampler(space, _sampler_seed(space, study, created, join))
    return Search(space, study, objective, url, folder)


def _open_study(space: SearchSpace, name: str, store: Any, url: str,
                made: tuple[Objective, str], config: Any, *, resume: bool, join: bool
                ) -> tuple[optuna.Study, bool]:
    """(the study, whether this process created it), as ``resume``/``join`` allow; ``made``
    is the objective and artifact directory a new study is created with."""
    from autobuild.train.config import check_new_recipe

    exists = name in optuna.study.get_all_study_names(store)
    if exists and not (resume or join):
        raise AutobuildError(f"study {name!r} already exists in {mask_url(url)}; pass --resume "
                             "to continue it, --join to add a worker, or --study NEW")
    if resume and not exists:
        raise AutobuildError(f"no study {name!r} to resume in {mask_url(url)}")
    if join and not exists:
        check_new_recipe(config, space.key("budget."), given=space.budget.model_dump())
    study = None if exists else _create(space, name, store, *made)
    if study is not None:
        return study, True
    # It existed, or another process created it a moment ago.
    study = load_study(name, store, url)
    recorded = _fingerprint(study)
    if recorded != space.fingerprint():
        raise AutobuildError(another_space(study, space, name, "--join" if join else "--resume",
                                           recorded))
    if url.startswith("sqlite"):
        refuse_second_sqlite_worker(study)
    return study, False


def _fingerprint(study: optuna.Study, wait_s: float = 60.0) -> str | None:
    """The study's space fingerprint; a study another worker created a moment ago gets a
    little time to have it written."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        recorded = study.user_attrs.get("space_fingerprint")
        if recorded is not None or time.monotonic() > deadline:
            return recorded
        time.sleep(0.5)


SQLITE_ONE_WORKER = ("SQLite takes one worker: it lacks the row locks Optuna's enqueued trials "
                     "need, and concurrent workers fail with \"Cannot tell a COMPLETE trial\" "
                     "(Optuna's FAQ); use PostgreSQL (--storage postgresql+psycopg://...) for "
                     "several workers, see docs/search.md")


def refuse_second_sqlite_worker(study: optuna.Study) -> None:
    """Refuse to work on a SQLite study while another worker's trial is alive."""
    from autobuild.search.study import live_trials

    alive = live_trials(study)
    if alive:
        worker = alive[0].user_attrs.get("worker", "another process")
        raise AutobuildError(f"study {study.study_name!r} is being worked on by {worker} "
                             f"(trial {alive[0].number} is running); {SQLITE_ONE_WORKER}")


def artifact_store(folder: str) -> Any:
    """A file-system artifact store (a folder every worker can reach), or S3 through
    Optuna's Boto3ArtifactStore for ``s3://bucket/prefix``."""
    if folder.startswith("s3://"):
        try:
            from optuna.artifacts import Boto3ArtifactStore
        except ImportError as exc:  # pragma: no cover - boto3 missing
            raise AutobuildError("s3:// artifacts need boto3: pip install boto3") from exc
        bucket = folder[len("s3://"):].split("/", 1)[0]
        return Boto3ArtifactStore(bucket)

    from optuna.artifacts import FileSystemArtifactStore

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise AutobuildError(f"cannot create the artifact directory {folder!r}: "
                             f"{exc.strerror}") from exc
    return FileSystemArtifactStore(folder)


def _create(space: SearchSpace, name: str, store: Any, objective: Objective, folder: str
            ) -> optuna.Study | None:
    """Create the study and enqueue its seeds (once: only the process whose create_study
    succeeds does it); None when another process created it first."""
    try:
        study = optuna.create_study(study_name=name, storage=store,
                                    directions=space.directions(), sampler=_sampler(space))
    except optuna.exceptions.DuplicatedStudyError:
        return None
    study.set_metric_names(list(space.objectives))
    study.set_user_attr("space", space.model_dump(mode="json"))
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("artifacts", folder)  # (export names it; report and export guard it)
    study.set_user_attr("baseline", {**objective.baseline, "top1": None})
    b = objective.analysis.baseline
    study.set_user_attr("baseline_spec", {"model": b.name, "num_classes": b.num_classes,
                                          "input_size": list(b.input_size), "init": space.init,
                                          "model_args": dict(b.model_args)})
    if space.seeding.baseline:
        study.enqueue_trial(seed_params(objective.groups, "baseline"),
                            user_attrs={"seed_kind": "baseline"})
    if space.seeding.all_converted:
        study.enqueue_trial(seed_params(objective.groups, "all_converted"),
                            user_attrs={"seed_kind": "all_converted"})
    return study


def attach(storage: str, study_name: str, *, device: str | None = None, quiet: bool = False,
           artifacts: str | None = None, heartbeat: tuple[int, int] | None = None) -> Search:
    """A worker for an existing study: its space is read from the study itself."""
    if storage.startswith("sqlite"):
        raise AutobuildError(SQLITE_ONE_WORKER)
    if device is not None:  # (the space's own device is checked once it is read)
        check_device(device)
    study = load_study(study_name, open_storage(storage, heartbeat=heartbeat), storage)
    if "space" not in study.user_attrs:
        raise AutobuildError(f"study {study_name!r} was not made by autobuild search")
    try:
        space = SearchSpace.model_validate(study.user_attrs["space"])
    except ValidationError as exc:  # (a space an older version accepted)
        raise schema_error(exc, f"study {study_name!r}'s search space: ") from None
    return prepare(space, storage=storage, study_name=study_name, join=True, device=device,
                   quiet=quiet, artifacts=artifacts, heartbeat=heartbeat)


def _pareto_line(search: Search) -> Any:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if search.objective.quiet:
            return
        front = len(pareto_trials(study))
        target = search.objective.n_trials or search.space.n_trials  # (the study's own)
        print(f"trial {trial.number} {trial.state.name.lower()}: {finished(study)}/"
              f"{target} finished, Pareto front {front}", file=sys.stderr, flush=True)

    return callback


def work(search: Search, n_trials: int) -> None:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) ones.
    Trials other workers are running count; a failed one does not (its retry runs). Stale
    trials (a worker that stopped sending heartbeats) are failed and re-queued here too."""
    from autobuild.search.interrupts import deliver_outside_storage
    from autobuild.search.objective import SurplusTrial
    from autobuild.train import DivergedError

    search.objective.n_trials = n_trials
    callbacks = [_pareto_line(search)]
    failures = 0
    with deliver_outside_storage():
        fail_dead_trials(search.study)  # even when no other worker is left to do it
        while finished(search.study) < n_trials:
            if finished(search.study) + running_elsewhere(search.study) >= n_trials:
                wait_for_others(search.study)  # the last trials run elsewhere (or went stale)
                continue
            before = finished(search.study)
            try:
                search.study.optimize(search.objective, n_trials=1, callbacks=callbacks,
                                      catch=(DivergedError, SurplusTrial))
            except KeyboardInterrupt:
                requeue_interrupted(search.study, search.objective.current)
                raise
            if finished(search.study) == before and not search.objective.surplus:
                failures += 1  # (a trial optimize() fails without raising: it diverged)
                if failures > n_trials:
                    raise DivergedError(
                        f"{failures} trials diverged, more than the {n_trials} the study "
                        "asks for; stopping the search (each trial's fail_reason: `autobuild "
                        "status`, trials.csv of `autobuild report`; lower the budget's lr or "
                        "set its clip_grad)")


def requeue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Put trial ``number`` (failed by an interrupt) back in the queue with the same
    parameters, so that ``--resume`` (or another worker) trains it."""
    if number is None:
        return
    trial = study.get_trials(deepcopy=False)[number]
    if trial.state != optuna.trial.TrialState.FAIL or "fail_reason" in trial.user_attrs \
            or trial.user_attrs.get("surplus"):
        return
    if any(t.user_attrs.get("requeued_from") == number for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(trial.params, user_attrs={
        "requeued_from": number, **{k: v for k, v in trial.user_attrs.items()
                                    if k == "seed_kind"}})


def run(space: SearchSpace | str | dict, *, overrides: tuple[str, ...] = (),
        storage: str | None = None, study_name: str | None = None, resume: bool = False,
        join: bool = False, n_trials: int | None = None, device: str | None = None,
        quiet: bool = False, artifacts: str | None = None,
        heartbeat: tuple[int, int] | None = None) -> optuna.Study:
    """Run (or continue, or join) a placement search; returns the study. ``space`` is a
    :class:`SearchSpace`, a YAML path or a dict; ``overrides`` are ``key.sub=value``.
    ``heartbeat`` = (interval, grace period) in seconds for stale-trial detection."""
    if not isinstance(space, SearchSpace):
        space = load_space(space, overrides)
    elif overrides:
        space = load_space(space.model_dump(mode="json"), overrides)
    if n_trials is not None:
        if not 1 <= n_trials <= 100_000:
            raise AutobuildError(f"--n-trials must be in 1..100000, got {n_trials}")
        space = space.model_copy(update={"n_trials": n_trials})
    search = prepare(space, storage=storage, study_name=study_name, resume=resume, join=join,
                     device=device, quiet=quiet, artifacts=artifacts, heartbeat=heartbeat)
    done = finished(search.study)
    if n_trials is not None and n_trials < done:  # (it would lower the study's target)
        raise AutobuildError(f"--n-trials {n_trials}: study {search.study.study_name!r} "
                             f"already has {done} finished trials; give more than {done} to "
                             "run more (`autobuild status` shows where it stands)")
    if n_trials is not None or "n_trials" not in search.study.user_attrs:
        search.study.set_user_attr("n_trials", space.n_trials)
    work(search, int(search.study.user_attrs["n_trials"]))
    return search.study


def run_worker(storage: str, study_name: str, *, device: str | None = None, quiet: bool = False,
               artifacts: str | None = None, heartbeat: tuple[int, int] | None = None
               ) -> optuna.Study:
    """One more worker on an existing study (until it holds its n_trials finished trials)."""
    search = attach(storage, study_name, device=device, quiet=quiet, artifacts=artifacts,
                    heartbeat=heartbeat)
    work(search, int(search.study.user_attrs.get("n_trials", search.space.n_trials)))
    return search.study
