"""A trial of a study as a saved model directory (plan + weights) for ``autobuild train``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import optuna

from autobuild.errors import AutobuildError

__all__ = ["export_trial", "train_command", "trial_plan"]


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
                 artifacts: str | None = None, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Write trial ``number`` as ``out`` (plan + weights: the trial's trained weights when the
    space kept them, else the initial weights the trial trained from, built from its seed:
    ``autobuild train OUT`` with the space's budget reproduces it). ``artifacts`` is the
    study's artifact directory (default: as ``search`` resolves it); ``force`` replaces a
    non-empty ``out`` whole, unless it is or holds one of ``keep`` (the study's database,
    its artifacts)."""
    from autobuild.api import build_plan
    from autobuild.files import ensure_writable_dir
    from autobuild.io import load, save

    if artifacts and not artifacts.startswith("s3://") and not os.path.isdir(artifacts):
        what = "is not a directory" if os.path.exists(artifacts) else "does not exist"
        recorded = study.user_attrs.get("artifacts")
        hint = f" (the study was created with {recorded})" if recorded else ""
        raise AutobuildError(f"--artifacts {artifacts!r} {what}; give the study's artifact "
                             f"directory, as passed to `search --artifacts`{hint}")
    ensure_writable_dir(out, force=force, keep=keep, writes="model")
    trial = _trial(study, number)
    plan = trial_plan(study, number)
    seed = trial.user_attrs.get("seed")
    model = build_plan(plan, seed=seed)
    trained = False
    artifact = trial.user_attrs.get("weights_artifact")
    if artifact:
        with tempfile.TemporaryDirectory() as tmp:
            _download_weights(study, number, artifact, artifacts,
                              os.path.join(tmp, "weights.safetensors"))
            from autobuild.io import save_plan

            save_plan(plan, os.path.join(tmp, "plan.yaml"))
            model = load(tmp)
        trained = True
    save(model, out, force=force)
    # (over a constraint: the search never trained it, whatever the weights it would start from)
    never_trained = trial.user_attrs.get("trained") is False
    return {"out": out, "placement": plan.placement.describe(), "trained_weights": trained,
            "seed": seed, "never_trained": never_trained}


def train_command(study: optuna.Study, out: str) -> str:
    """The ``autobuild train`` command that trains an exported trial as the search did:
    the space's data, its budget as flags and its seed (which also orders the data and draws
    the augmentation: without it the initial weights match but the run does not)."""
    import shlex

    from autobuild.train import TrainConfig
    from autobuild.train.config import flag_of

    space = study.user_attrs.get("space") or {}
    data = str(space.get("data"))
    argv = ["autobuild", "train", out, "--data", data]
    # (a study made before data_dir was refused for other data: the search ignored it)
    if space.get("data_dir") and data.partition(":")[0] in ("cifar10", "cifar100"):
        argv += ["--data-dir", space["data_dir"]]
    argv += ["--seed", str(space.get("seed", 0))]
    if space.get("device") not in (None, "auto"):
        argv += ["--device", space["device"]]
    fields = TrainConfig.model_fields
    for key, value in (space.get("budget") or {}).items():
        flag = flag_of(key)
        default = fields[key].default if key in fields else None
        if value is None or value == default and key not in ("epochs", "batch_size"):
            continue
        if key == "image_size" and not data.startswith("imagefolder:"):
            continue  # (a study made before: the search trained at the data's own size)
        if isinstance(value, bool):  # (--no-nesterov, --no-channels-last)
            argv.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return shlex.join(argv)


def _download_weights(study: optuna.Study, number: int, artifact: str, artifacts: str | None,
                      path: str) -> None:
    """Fetch the trial's kept weights; an artifact that is not where the study's artifacts
    are looked for is one line saying where, not a traceback."""
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    from autobuild.search.study import artifact_dir

    # Without --artifacts: where the study was created with (older studies did not record
    # it: the default folder). (Optuna wraps the storage: its URL is not at hand here.)
    folder = artifact_dir("", study.study_name, artifacts or study.user_attrs.get("artifacts"))
    try:
        download_artifact(artifact_store=_reader(folder), file_path=path,
                          artifact_id=artifact)
    except (ArtifactNotFound, FileNotFoundError):
        recorded = study.user_attrs.get("artifacts")
        hint = f" (the study was created with {recorded})" if recorded and \
            recorded != folder else ""
        raise AutobuildError(f"trial {number}'s weights (artifact {artifact}) are not in "
                             f"{folder}{hint}; pass --artifacts DIR, the directory the search "
                             "wrote them to") from None


def _reader(folder: str) -> Any:
    """The artifact store at ``folder`` (S3 for ``s3://bucket``), for reading: a folder that
    does not exist is not created."""
    if folder.startswith("s3://"):
        from autobuild.search.runner import artifact_store

        return artifact_store(folder)
    from optuna.artifacts import FileSystemArtifactStore

    if not os.path.isdir(folder):
        raise FileNotFoundError(folder)
    return FileSystemArtifactStore(folder)
