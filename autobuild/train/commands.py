"""``autobuild train`` and ``autobuild evaluate``."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Any

from autobuild.errors import AutobuildError
from autobuild.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, prepare_run_dir
from autobuild.train.config import TrainConfig
from autobuild.train.data import DATA_SPECS, Data, build_data
from autobuild.train.loop import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    RUN_FILE,
    check_fits,
    evaluate,
    train,
)

__all__ = ["add_parsers"]

_S = argparse.SUPPRESS  # absent flags stay absent: a resumed run keeps its saved recipe


def _add_data_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, default=None, help=DATA_SPECS)
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder crop size (default: the images' own size up to 64, else 224)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed random subset of N images (val stays whole)")


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    g = p.add_argument_group("recipe (defaults: " + ", ".join(
        f"{k}={d[k].default}" for k in ("epochs", "batch_size", "optimizer", "warmup_epochs",
                                        "clip_grad")) + ")")
    g.add_argument("--epochs", type=int, default=_S)
    g.add_argument("--batch-size", type=int, default=_S, help="per process (per GPU)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=_S)
    g.add_argument("--lr", type=float, default=_S,
                   help="peak lr (default 0.1 SGD / 1e-3 AdamW, times batch-size/128)")
    g.add_argument("--momentum", type=float, default=_S)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=_S)
    g.add_argument("--weight-decay", type=float, default=_S,
                   help="default 5e-4 SGD / 0.05 AdamW; never on norms, biases, Dirac alpha/beta")
    g.add_argument("--warmup-epochs", type=float, default=_S)
    g.add_argument("--label-smoothing", type=float, default=_S)
    g.add_argument("--clip-grad", default=_S,
                   help="max grad norm; auto = 0.5 for quadratic/multiplicative; 0 = off")
    g.add_argument("--amp", action="store_true", default=_S,
                   help="mixed precision (bf16 autocast by default)")
    g.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=_S,
                   help="fp16 uses a GradScaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=_S,
                   help="default: on for CUDA")
    g.add_argument("--compile", action="store_true", default=_S, help="torch.compile the model")
    g.add_argument("--ema", type=float, default=_S, metavar="DECAY",
                   help="keep an EMA of the weights (e.g. 0.9999); it is evaluated and saved")
    g.add_argument("--seed", type=int, default=_S)
    g.add_argument("--deterministic", action="store_true", default=_S)
    g.add_argument("--sync-bn", action="store_true", default=_S, help="SyncBatchNorm under DDP")
    g.add_argument("--device", default=_S, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=_S, help="data loader processes")
    g.add_argument("--log-interval", type=int, default=_S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def add_parsers(subparsers: Any) -> None:
    """Add ``train`` and ``evaluate`` to the ``autobuild`` command."""
    from autobuild.cli import add_conversion_arguments

    p = subparsers.add_parser(
        "train", help="train a baseline, a conversion or a saved model",
        description="Train MODEL (a baseline name, with --to for a conversion, or a saved "
                    "directory) on --data; `train --resume RUN` continues a run.")
    add_conversion_arguments(p, model_required=False)
    _add_data_arguments(p, required=False)
    p.add_argument("--out", help="run directory (default: runs/MODEL-FAMILY, or a saved "
                                 "MODEL directory itself)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or in MODEL, a run directory)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_recipe_arguments(p)
    p.set_defaults(run=_cmd_train)

    p = subparsers.add_parser("evaluate", help="val loss / top-1 / top-5 of a saved model")
    p.add_argument("run_dir", metavar="RUN", help="a run or saved model directory")
    _add_data_arguments(p, required=False)
    p.add_argument("--last", action="store_true",
                   help=f"evaluate {LAST_WEIGHTS} instead of {BEST_WEIGHTS}")
    p.add_argument("--batch-size", type=int, default=_S)
    p.add_argument("--device", default=_S)
    p.add_argument("--workers", type=int, default=_S)
    p.add_argument("--amp", action="store_true", default=_S)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_evaluate)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


def _data_for(args: argparse.Namespace, record: dict[str, Any] | None) -> Data:
    """The data the flags name, else the data a run recorded (same crop size)."""
    spec = args.data or (record or {}).get("spec")
    if not spec:
        raise AutobuildError(f"--data is required ({DATA_SPECS})")
    data_dir = args.data_dir or (record or {}).get("data_dir")
    size = args.image_size
    if size is None and record and spec == record.get("spec"):
        size = record["input_size"][1]
    subset = args.train_subset
    if subset is None and record and spec == record.get("spec"):
        subset = record.get("train_subset")  # a resumed run trains on the same images
    return build_data(spec, data_dir, download=args.download,
                      image_size=size if spec.startswith("imagefolder:") else None,
                      train_subset=subset)


def _fit_to_data(args: argparse.Namespace, data: Data) -> None:
    """The data decides the classifier width and the input shape of a new model."""
    if args.num_classes is not None and args.num_classes != data.num_classes:
        raise AutobuildError(f"--num-classes {args.num_classes} but {data.spec} has "
                             f"{data.num_classes} classes")
    if args.input_size is not None and tuple(args.input_size) != data.input_size:
        raise AutobuildError(f"--input-size {','.join(map(str, args.input_size))} but "
                             f"{data.spec} gives {','.join(map(str, data.input_size))} "
                             "(use --image-size to change the crop)")
    args.num_classes, args.input_size = data.num_classes, data.input_size


def _read_run(run: str) -> dict[str, Any] | None:
    import yaml

    try:
        with open(os.path.join(run, RUN_FILE)) as f:
            record = yaml.safe_load(f)
        return record if isinstance(record, dict) else None
    except (OSError, yaml.YAMLError):
        return None  # a directory `convert` wrote has no training record


def _cmd_train(args: argparse.Namespace) -> int:
    from autobuild.cli import converted_from_args

    overrides = _overrides(args)
    if args.resume:
        run = args.out or args.model
        if not run:
            raise AutobuildError("--resume needs the run directory: train --resume RUN")
        if args.family or args.sites or args.option or args.plan:
            raise AutobuildError("--resume continues a run as it was built; it takes no "
                                 "--to/--sites/--option/--plan")
        state = load_checkpoint(os.path.join(run, CHECKPOINT_FILE))
        cfg = TrainConfig.from_dict({**state["config"], **overrides})
        data = _data_for(args, state.get("data"))
        from autobuild.rewrite import Plan, apply_plan

        model = apply_plan(Plan.load(run), load_baseline_weights=False).model
        result = train(model, data, cfg, out_dir=run, resume=True)
    else:
        if not args.data:
            raise AutobuildError(f"--data is required ({DATA_SPECS})")
        model_dir = bool(args.model and os.path.isdir(args.model))
        run = args.out or (args.model if model_dir else os.path.join(
            "runs", f"{args.model}-{args.family or 'baseline'}"))
        adopt = model_dir and os.path.abspath(run) == os.path.abspath(args.model)
        prepare_run_dir(run, force=args.force, adopt=adopt, dry_run=True)
        data = _data_for(args, None)
        if not (model_dir or args.plan):
            _fit_to_data(args, data)
        cfg = TrainConfig(**overrides)
        import torch

        torch.manual_seed(cfg.seed)  # the initial weights are part of a reproducible run
        model = converted_from_args(args, allow_baseline=True).model
        _rank0(lambda: prepare_run_dir(run, force=args.force, adopt=adopt))
        result = train(model, data, cfg, out_dir=run)
    if not _is_main():
        return 0
    last = result.last
    summary = {"run": run, "epochs": last.epoch if last else 0, "best_top1": result.best_top1,
               "best_epoch": result.best_epoch, "last": last.to_dict() if last else None,
               "stopped_early": result.stopped_early, "seconds": result.seconds}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"best val top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}); "
              f"{len(result.history)} epochs in {result.seconds:.0f}s; saved to {run}")
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _rank0(fn: Any) -> None:
    """Only rank 0 touches the run directory (it is the only one that writes there)."""
    if _is_main():
        fn()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from autobuild.io import load

    record = _read_run(args.run_dir)
    overrides = _overrides(args)
    saved = (record or {}).get("config") or {}
    keep = {k: saved[k] for k in ("amp", "amp_dtype", "channels_last", "batch_size") if k in saved}
    cfg = TrainConfig.from_dict({**keep, **overrides})
    data = _data_for(args, (record or {}).get("data"))
    model = load(args.run_dir, weights_name=LAST_WEIGHTS if args.last else BEST_WEIGHTS)
    check_fits(model, data)
    result = {"run": args.run_dir, "data": data.spec, **evaluate(model, data, cfg)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run_dir} on {data.spec} ({result['images']} val images): top-1 "
              f"{result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}%  loss "
              f"{result['val_loss']:.4f}  ({result['images_per_s']:.0f} img/s)")
    return 0
