"""``autobuild train``: train a baseline, a conversion or a saved model; resume a run."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from autobuild.cli._common import PATH, add_conversion_arguments, model_from_args
from autobuild.cli._train_args import (
    add_data_arguments,
    add_recipe_arguments,
    config_overrides,
)
from autobuild.errors import AutobuildError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a baseline, a conversion or a saved model",
        description="Train MODEL (a baseline name, with --to for a conversion, or a saved "
                    "directory) on --data; `train --resume RUN` continues a run. A detector "
                    "(ssd300_vgg16, ssdlite320_mobilenet_v3_large) trains on detection data "
                    "with torchvision's detection recipe; its backbone is what --to converts.")
    add_conversion_arguments(p, model_required=False)
    add_data_arguments(p)
    p.add_argument("--out", type=PATH, help="run directory (default: runs/MODEL-FAMILY, or a "
                                            "saved MODEL directory itself)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or in MODEL, a run directory)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_recipe_arguments(p)
    p.set_defaults(run=run)


def _fit_to_data(args: argparse.Namespace, data: Any) -> None:
    """The data decides the classifier width and the input shape of a new model."""
    if args.num_classes is not None and args.num_classes != data.num_classes:
        raise AutobuildError(f"--num-classes {args.num_classes} but {data.spec} has "
                             f"{data.num_classes} classes")
    if args.input_size is not None and tuple(args.input_size) != data.input_size:
        raise AutobuildError(f"--input-size {','.join(map(str, args.input_size))} but "
                             f"{data.spec} gives {','.join(map(str, data.input_size))} "
                             "(use --image-size to change the crop)")
    args.num_classes, args.input_size = data.num_classes, data.input_size


def _fit_detector_to_data(args: argparse.Namespace, data: Any) -> None:
    """A new detector: one output per class plus the background, inputs of --image-size."""
    from autobuild.models import get_model_entry

    if args.num_classes is not None and args.num_classes != data.num_classes:
        raise AutobuildError(f"--num-classes {args.num_classes} but {data.spec} has "
                             f"{len(data.classes)} classes (+1 background = {data.num_classes})")
    from autobuild.train.detection import check_image_size

    native = get_model_entry(args.model).input_size
    size = args.image_size or native[1]
    check_image_size(args.model, size)
    if args.input_size is not None and tuple(args.input_size) != (native[0], size, size):
        raise AutobuildError("a detector's input size is --image-size N (square), not "
                             "--input-size")
    args.num_classes, args.input_size = data.num_classes, (native[0], size, size)


def _data(args: argparse.Namespace, record: dict[str, Any] | None, task: str) -> Any:
    from autobuild.train.runs import data_for_run

    return data_for_run(args.data, record, data_dir=args.data_dir, download=args.download,
                        image_size=args.image_size if task == "classification" else None,
                        train_subset=args.train_subset, augment=args.augment)


def _model_name(args: argparse.Namespace) -> str | None:
    """The baseline a new run trains: the name given, or that of the plan / saved model."""
    from autobuild.io import load_plan

    if args.plan:
        return load_plan(args.plan).model
    if args.model and os.path.isdir(args.model):
        return load_plan(args.model).model
    return args.model


@dataclass
class _Job:
    """What one `autobuild train` call trains, and where."""

    run_dir: str
    task: str
    model: Any
    data: Any
    cfg: Any
    resume: bool


def run(args: argparse.Namespace) -> int:
    from autobuild.train.runs import is_main_process

    job = _resumed_job(args) if args.resume else _new_job(args)
    result = _trainer(job.task)(job.model, job.data, job.cfg, out_dir=job.run_dir,
                                resume=job.resume)
    if not is_main_process():
        return 0
    return _report(args, job.run_dir, result, job.task)


# ---- a new run: directory, recipe, data, model -------------------------------------------
def _new_job(args: argparse.Namespace) -> _Job:
    from autobuild.train import prepare_run_dir
    from autobuild.train.devices import check_device, check_sync_bn
    from autobuild.train.distributed import wait_for_all_ranks
    from autobuild.train.regularize import check_regularizers
    from autobuild.train.runs import is_main_process
    from autobuild.train.runtime import check_finite
    from autobuild.train.tensorboard import check_log_dir

    recorded = _recorded_data(args)  # (read once: rank 0 may replace the directory soon)
    run_dir, adopt = _new_run_dir(args, recorded)
    name = _model_name(args)
    spec = args.data or (recorded or {}).get("spec")
    task = _task(name, spec) if name else "classification"
    cfg = _recipe(args, name, task)
    check_log_dir(cfg.tensorboard, run_dir=run_dir)
    check_device(str(cfg.device))  # before the run directory exists
    check_sync_bn(cfg)
    data = _new_data(args, name, task, recorded)
    weights = _start_weights(args, adopt)
    model = _build_model(args, cfg, weights)
    if weights:  # named here: the trainer's own check cannot say which file it was
        check_finite(model, f"the weights in {weights!r}")
    detection = task == "detection"
    check_regularizers(model, cfg, detection=detection,
                       image_size=None if detection else data.input_size[1:])
    _check_model_fits(model, data, detection)  # before --force clears a directory
    wait_for_all_ranks(str(cfg.device))  # every rank has read what rank 0 may now replace
    if is_main_process():  # only rank 0 touches the run directory
        prepare_run_dir(run_dir, force=args.force, adopt=adopt)  # (checked: _new_run_dir)
    wait_for_all_ranks(str(cfg.device))  # ...and no rank trains before it is ready
    return _Job(run_dir, task, model, data, cfg, resume=False)


def _check_model_fits(model: Any, data: Any, detection: bool) -> None:
    """The trainer checks it too; here it is refused before the run directory is touched
    (a --force that cleared another run, or a saved model given init.safetensors, for
    a model that cannot take the data)."""
    if detection:
        from autobuild.train.detection import check_detector

        check_detector(model, data)
    else:
        from autobuild.train.loop import check_fits

        check_fits(model, data)


def _new_run_dir(args: argparse.Namespace, recorded: dict[str, Any] | None
                 ) -> tuple[str, bool]:
    """Where the run goes, refused (before any work) if that would lose another run;
    whether it trains a saved model in its own directory (``adopt``)."""
    from autobuild.train import prepare_run_dir
    from autobuild.train.rundir import default_run_dir

    if not args.data and not recorded:
        from autobuild.train.data import DATA_SPECS

        raise AutobuildError(f"--data is required ({DATA_SPECS}, or detection data)")
    model_dir = bool(args.model and os.path.isdir(args.model))
    run_dir = args.out or (args.model if model_dir else default_run_dir(*_run_name(args)))
    adopt = model_dir and os.path.realpath(run_dir) == os.path.realpath(args.model)
    prepare_run_dir(run_dir, force=args.force, adopt=adopt, dry_run=True,
                    keep=_read_by_run(args, model_dir and not adopt, recorded))
    return run_dir, adopt


def _read_by_run(args: argparse.Namespace, model_dir: bool,
                 recorded: dict[str, Any] | None) -> list[str]:
    """What a new run reads (its data, saved model, plan, placement, weights): a --force
    that would delete them with the directory it replaces is refused."""
    from autobuild.train.runs import data_paths

    recorded = recorded or {}
    read = [args.model if model_dir else None, args.plan, args.placement, args.weights,
            *data_paths(args.data or recorded.get("spec"),
                        args.data_dir or recorded.get("data_dir"))]
    return [p for p in read if p and os.path.exists(p)]


def _run_name(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, family) of a new run's default directory ``runs/MODEL-FAMILY``: those of a
    --plan, the families of a --placement ("mixed" for several), else --to's."""
    from autobuild.io import load_placement, load_plan

    if args.plan:
        plan = load_plan(args.plan)
        return plan.model, plan.family or None
    if args.placement:
        families = load_placement(args.placement).families
        return args.model, (families.pop() if len(families) == 1 else
                            "mixed" if families else None)
    return args.model, args.family


def _task(name: str, spec: str | None) -> str:
    from autobuild.train.runs import task_for

    return task_for(name, spec)


def _recipe(args: argparse.Namespace, name: str | None, task: str) -> Any:
    """The recipe: the task's defaults, then the flags given (each already checked against
    the schema while parsing; here the combination is)."""
    from autobuild.train import TrainConfig
    from autobuild.train.config import check_new_recipe
    from autobuild.train.regularize import check_regularizers
    from autobuild.train.tensorboard import check_log_dir

    if task == "detection":
        from autobuild.train.detection import detection_config

        cfg = detection_config(name or "", **config_overrides(args))
    else:
        cfg = TrainConfig(**config_overrides(args))
    check_regularizers(None, cfg, detection=task == "detection")  # before the data is read
    check_new_recipe(cfg, given=config_overrides(args))
    check_log_dir(cfg.tensorboard)
    return cfg


def _new_data(args: argparse.Namespace, name: str | None, task: str,
              recorded: dict[str, Any] | None) -> Any:
    """The data, and a new model fitted to it (classes, input size)."""
    building = not (args.plan or (args.model and os.path.isdir(args.model)))
    if task == "detection":
        from autobuild.train.detection import default_augment

        # the recorded run's, else the reference's
        args.augment = args.augment or (recorded or {}).get("augment") or \
            default_augment(name or "")
        if not building and args.image_size:
            raise AutobuildError("--image-size applies to a new detector; a saved model or "
                                 "plan keeps the size it was built at")
    data = _data(args, recorded, task)
    if building:
        (_fit_detector_to_data if task == "detection" else _fit_to_data)(args, data)
    return data


def _recorded_data(args: argparse.Namespace) -> dict[str, Any] | None:
    """Without --data, a trained run given as the model trains again on the data it
    recorded (as evaluate, analyze and importance read it); with --data, the data given
    (fine-tuning on other data of the same class count is allowed)."""
    from autobuild.train.rundir import read_run_record

    if args.data or args.plan or not (args.model and os.path.isdir(args.model)):
        return None
    record = read_run_record(args.model) or {}
    return record.get("data") if (record.get("data") or {}).get("spec") else None


def _start_weights(args: argparse.Namespace, adopt: bool) -> str | None:
    """The weights file a saved model given as ``args.model`` starts from (None for a
    model built from a name or a --plan): a saved model trained in its own directory again
    (--force) starts from the weights it was saved with, not from the last run's."""
    from autobuild.train.rundir import adopted_weights

    if args.plan or not (args.model and os.path.isdir(args.model)):
        return None
    name = adopted_weights(args.model) if adopt else "weights.safetensors"
    return os.path.join(args.model, name)


def _build_model(args: argparse.Namespace, cfg: Any, weights: str | None = None) -> Any:
    import torch

    torch.manual_seed(cfg.seed)  # the initial weights are part of a reproducible run
    name = os.path.basename(weights) if weights else "weights.safetensors"
    return model_from_args(args, allow_baseline=True, seed=cfg.seed, weights_name=name)[0]


# ---- a resumed run ---------------------------------------------------------------------
def _resumed_job(args: argparse.Namespace) -> _Job:
    """Continue a run from its checkpoint, with the recipe train.yaml records (the latest
    one asked for: an edit of its ``config`` applies, checked as a flag is) or, after a
    divergence or a failure, the checkpoint's; flags given now override it. Refused, before
    anything is written, when nothing is left to train."""
    from autobuild.api import build_plan
    from autobuild.io import load_plan
    from autobuild.train import TrainConfig, load_checkpoint
    from autobuild.train.checkpoint import CHECKPOINT_FILE
    from autobuild.train.config import check_given, check_milestones, check_resume
    from autobuild.train.devices import check_sync_bn
    from autobuild.train.rundir import check_writable, read_run_record
    from autobuild.train.tensorboard import check_log_dir

    run_dir = _resume_dir(args)
    state = load_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE))
    plan = load_plan(run_dir)
    record = state.get("data") or {}
    task = _task(plan.model, args.data or record.get("spec"))
    # train.yaml, not the checkpoint: a resume interrupted before its first checkpoint
    # recorded its recipe (e.g. more --epochs) there only, and a user may have edited it.
    # A run that diverged or failed resumes the checkpoint's: the last that trained well.
    recorded = read_run_record(run_dir)
    from_record = bool(recorded) and recorded.get("status") not in ("diverged", "failed")
    recipe = recorded["config"] if from_record else state["config"]
    given = config_overrides(args)
    cfg = TrainConfig.from_dict({**recipe, **given})

    def key(field: str) -> str:  # a setting the user did not give now is the run's
        where = (f"recorded in {os.path.join(run_dir, 'train.yaml')}: edit it there"
                 if from_record else "the recipe of the checkpoint")
        return f"--{field.replace('_', '-')}" if field in given else f"{field} ({where})"

    check_resume(cfg, int(state["epoch"]), state.get("config") or {}, key("optimizer"))

    check_given(cfg, given, key)
    if given.keys() & {"lr_milestones", "epochs", "lr_schedule"}:  # (as a new run would)
        check_milestones(cfg, key)
    check_sync_bn(cfg, key("sync_bn"))
    check_writable(run_dir)
    check_log_dir(cfg.tensorboard, key("tensorboard"))
    data = _data(args, record, task)
    model = build_plan(plan, load_baseline_weights=False)
    return _Job(run_dir, task, model, data, cfg, resume=True)


def _resume_dir(args: argparse.Namespace) -> str:
    run_dir = args.out or args.model
    if not run_dir:
        raise AutobuildError("--resume needs the run directory: train --resume RUN")
    if args.out and args.model and os.path.abspath(args.out) != os.path.abspath(args.model):
        raise AutobuildError(f"--resume continues one run: {args.model!r} and --out "
                             f"{args.out!r} name two; give the run directory once")
    given = {"--to": args.family, "--sites": args.sites, "--option": args.option,
             "--plan": args.plan, "--placement": args.placement, "--init": args.init,
             "--num-classes": args.num_classes, "--input-size": args.input_size,
             "--weights": args.weights, "--model-arg": args.model_arg,
             "--force": args.force or None}
    named = [flag for flag, value in given.items() if value is not None]
    if named:
        raise AutobuildError(f"--resume continues a run as it was built; it takes no "
                             f"{', '.join(named)}")
    if not os.path.isdir(run_dir):
        raise AutobuildError(f"no run directory {run_dir!r} to resume")
    return run_dir


def _trainer(task: str) -> Any:
    if task == "detection":
        from autobuild.train.detection import train_detection

        return train_detection
    from autobuild.train import train

    return train


def _report(args: argparse.Namespace, run_dir: str, result: Any, task: str) -> int:
    last = result.last
    key = "best_map" if task == "detection" else "best_top1"
    best = getattr(result, key)
    summary = {"run": run_dir, "task": task, "epochs": last.epoch if last else 0, key: best,
               "best_epoch": result.best_epoch, "last": last.to_dict() if last else None,
               "stopped_early": result.stopped_early, "seconds": result.seconds}
    if task == "detection":  # the best epoch's (the saved weights.safetensors)
        epoch = next((m for m in result.history if m.epoch == result.best_epoch), last)
        summary.update(map=epoch.map if epoch else None, map_50=epoch.map_50 if epoch else None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        # (after a resume the time is this session's: its epochs, and the run's in all)
        now = (last.epoch if last else 0) - result.first_epoch + 1
        ran = f"{_epochs(max(now, 0))} in {result.seconds:.0f}s" + (
            f" ({len(result.history)} in all)" if result.first_epoch > 1 else "")
        head = (f"best val mAP {best:.4f} (mAP@0.5 {summary['map_50'] or 0:.4f}, epoch "
                f"{result.best_epoch})" if task == "detection" else
                f"best val top-1 {best:.2f}% (epoch {result.best_epoch})")
        print(f"{head}; {ran}; saved to {run_dir}")
    return 0


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"
