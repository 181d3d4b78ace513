"""The seed trials of a search: the baseline, everything converted, and placements that
revert the sites with the highest RI of the all-converted network (docs/search.md)."""

from __future__ import annotations

from typing import Any

import optuna
import torch

__all__ = ["revert_top_ri", "seed_params", "seed_reverts"]


def seed_params(search_groups: list, how: str) -> dict[str, str]:
    """The parameters of a seed trial: every decision at keep (``baseline``) or at its
    first conversion (``all_converted``)."""
    params = {}
    for group in search_groups:
        label = "keep"
        if how == "all_converted":
            label = next((lab for lab, c in zip(group.labels, group.choices, strict=True)
                          if c is not None), "keep")
        for name in ([f"site:{s}" for s in group.sites] if group.per_site else [group.name]):
            params[name] = label
    return params


def seed_reverts(trial: optuna.Trial, model: torch.nn.Module, objective: Any) -> None:
    """The RI step, if ``trial`` is the all-converted seed and the study has no RI yet.
    If measuring RI fails, the search goes on without the reverts and the trial keeps its
    training: the reason is recorded on the trial (``ri_error``) and said."""
    if trial.user_attrs.get("seed_kind") != "all_converted" or \
            "ri_error" in trial.user_attrs or "ri" in trial.study.user_attrs:
        return
    try:
        revert_top_ri(trial.study, trial.params, model, objective)
    except Exception as exc:  # (not an interrupt: that re-queues the trial)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        trial.set_user_attr("ri_error", reason)
        objective.say(f"trial {trial.number}: no RI seeds, measuring RI failed: {reason}")


def revert_top_ri(study: optuna.Study, params: dict[str, Any], model: torch.nn.Module,
                  objective: Any) -> None:
    """RI of the trained all-converted network (``model``, trained with ``params``),
    recorded on the study as ``ri``, and placements that revert its top-RI decisions
    enqueued. Runs inside that trial: a worker that dies here leaves the trial running, so
    it is re-queued, and whoever trains it again measures the RI."""
    from autobuild.search.importance import importance

    space = objective.space
    k = space.seeding.revert_top_ri
    # Mid-training: the validation loader draws its seed from the global RNG, and the
    # trial's later shuffles must not depend on whether this run measured the RI.
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        table = importance(model, objective.data, device=str(objective.config.device),
                           progress=False)
    # Pin every parameter: those the all-converted trial was not asked (sites inside a
    # conversion) start at keep, so a revert goes back to the baseline there too.
    base = {name: "keep" for name in seed_params(objective.groups, "baseline")}
    base.update(params)
    # Each seed reverts one more *decision*: a site whose decision is shared (a group that
    # is not per-site) or already at keep adds nothing new, so it is skipped and the k
    # seeds are k distinct placements. The RI is recorded after the seeds are queued: a
    # study with "ri" has all of them.
    reverted, enqueued = dict(base), 0
    # A worker stopped between two enqueues left some: the trial trained again adds the rest.
    queued = {t.user_attrs.get("seed_kind") for t in study.get_trials(deepcopy=False)}
    for site in table["site"]:
        if enqueued >= k:
            break
        keys = [f"site:{site}" if g.per_site else g.name
                for g in objective.groups if site in g.sites]
        changed = [key for key in keys if reverted.get(key, "keep") != "keep"]
        if not changed:
            continue
        reverted.update(dict.fromkeys(changed, "keep"))
        if space.seeding.baseline and all(v == "keep" for v in reverted.values()):
            break  # every decision reverted: the baseline, already a seed
        enqueued += 1
        kind = f"revert_top_ri_{enqueued}"
        if kind not in queued:
            study.enqueue_trial(dict(reverted), user_attrs={"seed_kind": kind})
    study.set_user_attr("ri", table.to_dict(orient="records"))


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA devices ``model`` is on (whose RNG ``fork_rng`` must restore)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
