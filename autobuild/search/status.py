"""Where a search stands: trials by state, live workers, the Pareto front and an ETA. Asking
also fails (and so re-queues) trials whose worker stopped sending heartbeats, so a study
whose workers all died is repaired by the next look at it."""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import optuna

from autobuild.search.report import failure_reason, pareto_trials
from autobuild.search.study import fail_dead_trials, finished, live_trials, open_storage

__all__ = ["study_status", "storage_status"]


def study_status(study: optuna.Study) -> dict[str, Any]:
    with contextlib.suppress(optuna.exceptions.StorageInternalError):  # (a read-only file)
        fail_dead_trials(study)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    live = live_trials(study)
    workers = sorted({t.user_attrs.get("worker", "?") for t in live})
    target = int(study.user_attrs.get("n_trials", 0)) or None
    done = finished(study)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                 and t.datetime_start and t.datetime_complete]
    eta = None  # (no worker alive: nothing will finish, so no time to show)
    if target and durations and done < target and live:
        eta = statistics.median(durations) * (target - done) / max(1, len(workers))
    front = 0
    if done:
        front = len(pareto_trials(study))
    return {"study": study.study_name, "trials": len(trials), "states": states,
            "finished": done, "n_trials": target, "workers_alive": workers,
            "running": [t.number for t in live], "pareto_size": front,
            "failed": {str(t.number): failure_reason(t, trials) for t in trials
                       if t.state == optuna.trial.TrialState.FAIL},
            "eta_s": round(eta, 1) if eta is not None else None}


def storage_status(url: str, study: str | None = None) -> list[dict[str, Any]]:
    """The status of ``study`` (or of every study) in the storage at ``url``."""
    from autobuild.search.study import load_study

    store = open_storage(url, heartbeat=False, create=False)
    names = [study] if study else sorted(optuna.study.get_all_study_names(store))
    out = []
    for name in names:
        # Stale means silent for longer than the grace period the study's workers use.
        beat = load_study(name, store, url).user_attrs.get("heartbeat")
        watched = open_storage(url, heartbeat=tuple(beat) if beat else True)
        out.append(study_status(load_study(name, watched, url)))
    return out
