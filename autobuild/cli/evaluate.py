"""``autobuild evaluate``: val loss / top-1 / top-5 of a saved model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autobuild.cli.train import add_data_arguments, config_overrides

_S = argparse.SUPPRESS


def add_parser(sub: Any) -> None:
    from autobuild.train import BEST_WEIGHTS, LAST_WEIGHTS

    p = sub.add_parser("evaluate", help="val loss / top-1 / top-5 of a saved model")
    p.add_argument("run_dir", metavar="RUN", help="a run or saved model directory")
    add_data_arguments(p)
    p.add_argument("--last", action="store_true",
                   help=f"evaluate {LAST_WEIGHTS} instead of {BEST_WEIGHTS}")
    p.add_argument("--batch-size", type=int, default=_S, help="evaluation batch size")
    p.add_argument("--device", default=_S, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=_S, help="data loader processes")
    p.add_argument("--amp", action="store_true", default=_S, help="mixed precision")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.io import load
    from autobuild.train import BEST_WEIGHTS, LAST_WEIGHTS, TrainConfig, evaluate
    from autobuild.train.loop import check_fits
    from autobuild.train.runs import data_for_run, read_run_record

    record = read_run_record(args.run_dir)
    saved = (record or {}).get("config") or {}
    keep = {k: saved[k] for k in ("amp", "amp_dtype", "channels_last", "batch_size") if k in saved}
    cfg = TrainConfig.from_dict({**keep, **config_overrides(args)})
    data = data_for_run(args.data, (record or {}).get("data"), data_dir=args.data_dir,
                        download=args.download, image_size=args.image_size,
                        train_subset=args.train_subset)
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
