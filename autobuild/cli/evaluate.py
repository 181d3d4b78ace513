"""``autobuild evaluate``: val loss / top-1 / top-5 of a saved classifier, or COCO-style mAP,
mAP@0.5 and per-class AP of a saved detector."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from autobuild.cli._common import PATH, recipe_value, status
from autobuild.cli._train_args import add_data_arguments, config_overrides

_S = argparse.SUPPRESS


def add_parser(sub: Any) -> None:
    from autobuild.train import BEST_WEIGHTS, LAST_WEIGHTS

    p = sub.add_parser("evaluate", help="val top-1/top-5 of a classifier, mAP of a detector",
                       description="Evaluate a saved run or model on the val split of --data "
                                   "(default: the data it trained on).")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a run or saved model directory")
    add_data_arguments(p, training=False)
    p.add_argument("--last", action="store_true",
                   help=f"evaluate {LAST_WEIGHTS} instead of {BEST_WEIGHTS}")
    p.add_argument("--batch-size", type=recipe_value("batch_size"), default=_S,
                   help="evaluation batch size")
    p.add_argument("--device", type=recipe_value("device"), default=_S,
                   help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=recipe_value("workers"), default=_S,
                   help="data loader processes")
    p.add_argument("--amp", action="store_true", default=_S, help="mixed precision")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.io import load
    from autobuild.rewrite import plan_of
    from autobuild.train import BEST_WEIGHTS, LAST_WEIGHTS, TrainConfig
    from autobuild.train.rundir import read_run_record
    from autobuild.train.runs import data_for_run, task_for
    from autobuild.train.runtime import check_finite

    record = read_run_record(args.run_dir)
    saved = (record or {}).get("config") or {}
    keep = {k: saved[k] for k in ("amp", "amp_dtype", "channels_last", "batch_size") if k in saved}
    cfg = TrainConfig.from_dict({**keep, **config_overrides(args)})
    status(f"loading {args.run_dir}")
    weights = LAST_WEIGHTS if args.last else BEST_WEIGHTS
    model = load(args.run_dir, weights_name=weights)
    check_finite(model, f"the weights in {os.path.join(args.run_dir, weights)!r}")
    data_record = (record or {}).get("data")
    task = task_for(plan_of(model).model, args.data or (data_record or {}).get("spec"))
    data = data_for_run(args.data, data_record, data_dir=args.data_dir,
                        download=args.download,
                        image_size=args.image_size if task == "classification" else None,
                        val_only=True)
    if task == "detection":
        return _detection(args, model, data, cfg)
    from autobuild.train import evaluate
    from autobuild.train.loop import check_fits

    check_fits(model, data)
    status(f"evaluating on {data.spec} ({len(data.val)} images)")  # type: ignore[arg-type]
    result = {"run": args.run_dir, "data": data.spec, **evaluate(model, data, cfg)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run_dir} on {data.spec} ({result['images']} val images): top-1 "
              f"{result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}%  loss "
              f"{result['val_loss']:.4f}  ({result['images_per_s']:.0f} img/s)")
    return 0


def _detection(args: argparse.Namespace, model: Any, data: Any, cfg: Any) -> int:
    from autobuild.cli._common import table
    from autobuild.train.detection import evaluate_detection, prepare_detector, set_image_size

    prepare_detector(model)
    if args.image_size:  # evaluate at another size than the one it trained at
        set_image_size(model, (args.image_size, args.image_size))
    result = {"run": args.run_dir, "data": data.spec, **evaluate_detection(model, data, cfg)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    rows = [[name, f"{v['ap']:.4f}", f"{v['ap_50']:.4f}"]
            for name, v in result["per_class"].items()]
    if rows:
        print(table(rows, ["class", "AP", "AP@0.5"]))
    print(f"{args.run_dir} on {data.spec} ({result['images']} val images): mAP "
          f"{result['map']:.4f}  mAP@0.5 {result['map_50']:.4f}  mAP@0.75 "
          f"{result['map_75']:.4f}  ({result['images_per_s']:.1f} img/s)")
    return 0
