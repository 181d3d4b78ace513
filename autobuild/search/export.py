"""A trial of a study as a saved model directory (plan + weights) for ``autobuild train``."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import optuna

from autobuild.errors import AutobuildError

__all__ = ["export_trial", "trial_plan"]


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if not isinstance(number, int) or not 0 <= number < len(trials):
        raise AutobuildError(f"study {study.study_name!r} has no trial {number} (trials: "
                             f"0..{len(trials) - 1})")
    trial = trials[number]
    if "placement_json" not in trial.user_attrs:
        raise AutobuildError(f"trial {number} of {study.study_name!r} has no placement "
                             f"(state {trial.state.name})")
    return trial


def trial_plan(study: optuna.Study, number: int) -> Any:
    """The plan of trial ``number``: the study's baseline with the trial's placement."""
    from autobuild.rewrite import Placement, Plan

    trial = _trial(study, number)
    spec = study.user_attrs.get("baseline_spec")
    if not spec:
        raise AutobuildError(f"study {study.study_name!r} was not made by autobuild search")
    placement = Placement(json.loads(trial.user_attrs["placement_json"]))
    return Plan(spec["model"], placement, spec["init"], spec["num_classes"],
                spec["input_size"], model_args=spec.get("model_args"))


def export_trial(study: optuna.Study, number: int, out: str, *, force: bool = False,
                 artifacts: str | None = None) -> dict[str, Any]:
    """Write trial ``number`` as ``out`` (plan + weights: the trial's trained weights when the
    space kept them, else freshly initialised ones)."""
    from autobuild.api import build_plan
    from autobuild.files import ensure_writable_dir
    from autobuild.io import load, save

    ensure_writable_dir(out, force=force)
    trial = _trial(study, number)
    plan = trial_plan(study, number)
    model = build_plan(plan)
    trained = False
    artifact = trial.user_attrs.get("weights_artifact")
    if artifact:
        from optuna.artifacts import FileSystemArtifactStore, download_artifact

        from autobuild.search.study import artifact_dir

        storage_url = getattr(study._storage, "url", "")
        folder = artifact_dir(storage_url, study.study_name, artifacts)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            download_artifact(artifact_store=FileSystemArtifactStore(folder),
                              file_path=path, artifact_id=artifact)
            from autobuild.io import save_plan

            save_plan(plan, os.path.join(tmp, "plan.yaml"))
            model = load(tmp)
        trained = True
    save(model, out, force=force)
    return {"out": out, "placement": plan.placement.summary(), "trained_weights": trained}
