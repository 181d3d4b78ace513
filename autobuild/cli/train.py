"""``autobuild train``: train a baseline, a conversion or a saved model; resume a run."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Any

from autobuild.cli._common import add_conversion_arguments, model_from_args
from autobuild.errors import AutobuildError

_S = argparse.SUPPRESS  # absent flags stay absent: a resumed run keeps its saved recipe


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    from autobuild.train.data import DATA_SPECS
    from autobuild.train.detection_data import AUGMENTATIONS, DETECTION_SPECS

    p.add_argument("--data", default=None,
                   help=f"classification: {DATA_SPECS}; detection: {DETECTION_SPECS}")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder crop size (default: the images' own size up to 64, else "
                        "224); for a detector, the size it resizes its inputs to (default its "
                        "own: 300 or 320)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed random subset of N images (val stays whole)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="detection training augmentation (torchvision's references): ssd = "
                        "photometric distortion, zoom out, IoU crop, flip; ssdlite = IoU crop, "
                        "flip (default: ssd for ssd300_vgg16, ssdlite for ssdlite320)")


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    from autobuild.train import TrainConfig

    d = TrainConfig.__dataclass_fields__
    g = p.add_argument_group("recipe (classifier defaults: " + ", ".join(
        f"{k}={d[k].default}" for k in ("epochs", "batch_size", "optimizer", "warmup_epochs",
                                        "clip_grad")) + "; detectors default to torchvision's "
        "detection recipe, see autobuild.train.detection.DETECTION_RECIPES)")
    g.add_argument("--epochs", type=int, default=_S, help="training epochs")
    g.add_argument("--batch-size", type=int, default=_S, help="per process (per GPU)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=_S, help="optimizer")
    g.add_argument("--lr", type=float, default=_S,
                   help="peak lr (default 0.1 SGD / 1e-3 AdamW, times batch-size/128)")
    g.add_argument("--momentum", type=float, default=_S, help="SGD momentum (default 0.9)")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=_S,
                   help="plain momentum instead of Nesterov's")
    g.add_argument("--weight-decay", type=float, default=_S,
                   help="default 5e-4 SGD / 0.05 AdamW; never on norms, biases, Dirac alpha/beta")
    g.add_argument("--warmup-epochs", type=float, default=_S, help="linear warm-up length")
    g.add_argument("--lr-schedule", choices=("cosine", "multistep"), default=_S,
                   help="after warm-up: cosine to zero, or x lr-gamma at each milestone")
    g.add_argument("--lr-milestones", type=int, nargs="+", default=_S, metavar="EPOCH",
                   help="multistep epochs (default: 2/3 and 11/12 of the run)")
    g.add_argument("--lr-gamma", type=float, default=_S, help="multistep factor (default 0.1)")
    g.add_argument("--label-smoothing", type=float, default=_S, help="in [0, 1)")
    g.add_argument("--clip-grad", default=_S,
                   help="max grad norm; auto = 0.5 for quadratic/multiplicative (10 for "
                        "detectors); 0 = off")
    g.add_argument("--amp", action="store_true", default=_S,
                   help="mixed precision (bf16 autocast by default)")
    g.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=_S,
                   help="fp16 uses a GradScaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=_S,
                   help="default: on for CUDA")
    g.add_argument("--compile", action="store_true", default=_S, help="torch.compile the model")
    g.add_argument("--ema", type=float, default=_S, metavar="DECAY",
                   help="keep an EMA of the weights (e.g. 0.9999); it is evaluated and saved")
    g.add_argument("--seed", type=int, default=_S, help="seed of weights, data order, augmentation")
    g.add_argument("--deterministic", action="store_true", default=_S,
                   help="deterministic algorithms (slower)")
    g.add_argument("--sync-bn", action="store_true", default=_S, help="SyncBatchNorm under DDP")
    g.add_argument("--device", default=_S, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=_S, help="data loader processes")
    g.add_argument("--log-interval", type=int, default=_S,
                   help="steps between loss checks and progress updates")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar or per-epoch lines")
    g.add_argument("--tensorboard", default=_S, metavar="DIR",
                   help="log scalars every epoch, and activation / weight / gradient "
                        "histograms every --tensorboard-every epochs, to DIR")
    g.add_argument("--tensorboard-every", type=int, default=_S, metavar="N",
                   help="epochs between TensorBoard histograms (default 5, and the last)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a baseline, a conversion or a saved model",
        description="Train MODEL (a baseline name, with --to for a conversion, or a saved "
                    "directory) on --data; `train --resume RUN` continues a run. A detector "
                    "(ssd300_vgg16, ssdlite320_mobilenet_v3_large) trains on detection data "
                    "with torchvision's detection recipe; its backbone is what --to converts.")
    add_conversion_arguments(p, model_required=False)
    add_data_arguments(p)
    p.add_argument("--out", help="run directory (default: runs/MODEL-FAMILY, or a saved "
                                 "MODEL directory itself)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or in MODEL, a run directory)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_recipe_arguments(p)
    p.set_defaults(run=run)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the user gave on the command line."""
    from autobuild.train import TrainConfig

    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


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


def run(args: argparse.Namespace) -> int:
    from autobuild.train import TrainConfig, load_checkpoint, prepare_run_dir
    from autobuild.train.checkpoint import CHECKPOINT_FILE
    from autobuild.train.runs import is_main_process, task_for

    overrides = config_overrides(args)
    if args.resume:
        run_dir = args.out or args.model
        if not run_dir:
            raise AutobuildError("--resume needs the run directory: train --resume RUN")
        if args.family or args.sites or args.option or args.plan:
            raise AutobuildError("--resume continues a run as it was built; it takes no "
                                 "--to/--sites/--option/--plan")
        state = load_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE))
        from autobuild.api import build_plan
        from autobuild.io import load_plan

        plan = load_plan(run_dir)
        record = state.get("data") or {}
        task = task_for(plan.model, args.data or record.get("spec"))
        cfg = TrainConfig.from_dict({**state["config"], **overrides})
        data = _data(args, record, task)
        model = build_plan(plan, load_baseline_weights=False)
        result = _trainer(task)(model, data, cfg, out_dir=run_dir, resume=True)
    else:
        if not args.data:
            from autobuild.train.data import DATA_SPECS

            raise AutobuildError(f"--data is required ({DATA_SPECS}, or detection data)")
        model_dir = bool(args.model and os.path.isdir(args.model))
        run_dir = args.out or (args.model if model_dir else os.path.join(
            "runs", f"{args.model}-{args.family or 'baseline'}"))
        adopt = model_dir and os.path.abspath(run_dir) == os.path.abspath(args.model)
        prepare_run_dir(run_dir, force=args.force, adopt=adopt, dry_run=True)
        name = _model_name(args)
        task = task_for(name, args.data) if name else "classification"
        if task == "detection":
            from autobuild.train.detection import default_augment, detection_config

            args.augment = args.augment or default_augment(name)  # the reference's
        data = _data(args, None, task)
        if task == "detection":
            if not (model_dir or args.plan):
                _fit_detector_to_data(args, data)
            elif args.image_size:
                raise AutobuildError("--image-size applies to a new detector; a saved model "
                                     "or plan keeps the size it was built at")
            cfg = detection_config(name, **overrides)
        else:
            if not (model_dir or args.plan):
                _fit_to_data(args, data)
            cfg = TrainConfig(**overrides)
        import torch

        torch.manual_seed(cfg.seed)  # the initial weights are part of a reproducible run
        model = model_from_args(args, allow_baseline=True)[0]
        if is_main_process():  # only rank 0 touches the run directory
            prepare_run_dir(run_dir, force=args.force, adopt=adopt)
        result = _trainer(task)(model, data, cfg, out_dir=run_dir)
    if not is_main_process():
        return 0
    return _report(args, run_dir, result, task)


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
    elif task == "detection":
        print(f"best val mAP {best:.4f} (mAP@0.5 {summary['map_50'] or 0:.4f}, epoch "
              f"{result.best_epoch}); {len(result.history)} epochs in {result.seconds:.0f}s; "
              f"saved to {run_dir}")
    else:
        print(f"best val top-1 {best:.2f}% (epoch {result.best_epoch}); "
              f"{len(result.history)} epochs in {result.seconds:.0f}s; saved to {run_dir}")
    return 0
