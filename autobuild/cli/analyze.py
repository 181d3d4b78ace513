"""``autobuild analyze``: activation, gradient and weight statistics of a saved run, per
converted site and per layer, as CSV files and PNG plots; ``--compare`` sets a second run
(e.g. the baseline) beside it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autobuild.cli._common import DEVICE, NON_NEGATIVE_INT, PATH, POSITIVE_FLOAT, POSITIVE_INT


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze", help="activation / gradient / weight statistics of a run (CSV + PNG)",
        description="Run a few val batches through RUN and write, per layer (every Conv2d, "
                    "Linear, batch norm and family layer) and per converted site: activation "
                    "statistics and histograms, gradient norms and weight distributions "
                    "(quadratic layers' first- and second-order terms apart), as CSV files "
                    "and PNG plots in --out.")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a run or saved model directory")
    p.add_argument("--data", default=None, type=PATH,
                   help="data spec (default: the data RUN trained on); see `train --help`")
    p.add_argument("--data-dir", default=None, type=PATH, help="folder holding the CIFAR batches")
    p.add_argument("--out", required=True, type=PATH, help="output folder")
    p.add_argument("--compare", metavar="RUN2", type=PATH,
                   help="a second run (e.g. the baseline) analysed on the same batches; "
                        "compare.csv's ratios are RUN2 / RUN")
    p.add_argument("--batches", type=POSITIVE_INT, default=4, help="val batches to run (default 4)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="default 16")
    p.add_argument("--saturation", type=POSITIVE_FLOAT, default=6.0,
                   help="|x| counted as saturated from this value (default 6)")
    p.add_argument("--last", action="store_true", help="analyse last.safetensors")
    p.add_argument("--device", default="auto", type=DEVICE,
                   help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0, help="data loader processes")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="CSV files only")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (an earlier analysis) as a whole")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.train.analyze_run import analyze_run

    summary = analyze_run(args.run_dir, args.out, data=args.data, data_dir=args.data_dir,
                          compare=args.compare, batches=args.batches,
                          batch_size=args.batch_size, device=args.device,
                          workers=args.workers, saturation=args.saturation, last=args.last,
                          plots=args.plots, force=args.force)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['run']} ({summary['task']}) on {summary['data']}: {summary['images']} "
          f"val images, {summary['layers']} layers, {summary['sites']} converted "
          f"site{'s' * (summary['sites'] != 1)} ({summary['converted_layers']} of the "
          "layers)"
          + (f"; compared with {summary['compare']}" if "compare" in summary else ""))
    for path in summary["files"]:
        print(f"  {path}")
    return 0
