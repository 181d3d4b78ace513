"""``autobuild importance``: RI of every converted site of a trained model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from autobuild.cli._common import PATH, human, recipe_value, table
from autobuild.errors import AutobuildError


def add_parser(sub: Any) -> None:
    from autobuild.cli._train_args import add_data_arguments

    p = sub.add_parser("importance", help="RI importance of a trained model's converted sites",
                       description="Measure RI = P_M*P_W / max(dtop-1, eps) of every converted "
                                   "site (its higher-order part masked exactly) on the val "
                                   "split of --data (default: the data the run trained on).")
    p.add_argument("run_dir", metavar="RUN", type=PATH, help="a run or saved model directory")
    add_data_arguments(p, training=False)  # only the val split is read
    p.add_argument("--batch-size", type=recipe_value("batch_size"), default=256,
                   help="evaluation batch size")
    p.add_argument("--device", type=recipe_value("device"), default="auto",
                   help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--csv", type=PATH, help="also write the table as CSV to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --csv file")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autobuild.files import atomic_write_text
    from autobuild.io import WEIGHTS_FILE, load
    from autobuild.search.importance import importance
    from autobuild.train.rundir import read_run_record
    from autobuild.train.runs import data_for_run
    from autobuild.train.runtime import check_finite

    _check_run(args.run_dir)  # first: without a run, "--data is required" misleads
    _check_classifier(args.run_dir)
    if args.csv:
        _check_csv(args.csv, args.force, args.run_dir)  # before the evaluations, not after
    record = read_run_record(args.run_dir)
    data = data_for_run(args.data, (record or {}).get("data"), data_dir=args.data_dir,
                        download=args.download, image_size=args.image_size)
    model = load(args.run_dir)
    check_finite(model, f"the weights in {os.path.join(args.run_dir, WEIGHTS_FILE)!r}")
    frame = importance(model, data, batch_size=args.batch_size, device=args.device,
                       progress=not args.json and sys.stderr.isatty())
    if args.csv:
        atomic_write_text(args.csv, frame.to_csv(index=False))
    if args.json:
        print(json.dumps({"run": args.run_dir, **frame.attrs,
                          "sites": frame.to_dict(orient="records")}, indent=2))
        return 0
    rows = [[r.site, r.choice, human(r.params), human(r.macs), f"{100 * r.p_params:.1f}%",
             f"{100 * r.p_macs:.1f}%", f"{r.delta_top1:+.2f}", f"{r.ri:.3g}"]
            for r in frame.itertuples()]
    print(table(rows, ["site", "choice", "params", "MACs", "P_M", "P_W", "dtop-1 (pp)", "RI"]))
    print(f"\nval top-1 {frame.attrs['top1']:.2f}% on {frame.attrs['val_images']} images; "
          f"RI = P_M·P_W / max(dtop-1, ε), ε = 1/{frame.attrs['val_images']}; high RI = revert "
          "first")
    return 0


def _check_classifier(path: str) -> None:
    """RI is defined on top-1 (QuadraLib's): a detector has none."""
    from autobuild.io import load_plan
    from autobuild.train.detection import is_detector

    name = load_plan(path).model
    if not name.startswith("custom:") and is_detector(name):
        raise AutobuildError(f"RUN {path!r} is a detector ({name}): RI importance is measured "
                             "on a classifier's val top-1; `autobuild analyze` measures a "
                             "detector's sites")


def _check_run(path: str) -> None:
    if not os.path.exists(path):
        raise AutobuildError(f"RUN {path!r} does not exist; give a run or saved model directory")
    if not os.path.isdir(path):
        raise AutobuildError(f"RUN {path!r} is not a directory; give a run or saved model "
                             "directory")


def _check_csv(path: str, force: bool, run_dir: str) -> None:
    from autobuild.files import OUTPUT_FILES, output_holding

    if os.path.isdir(path):
        raise AutobuildError(f"--csv {path!r} is a directory; give a file path")
    if os.path.exists(path) and not force:
        raise AutobuildError(f"--csv {path!r} exists; pass --force to overwrite it")
    run = os.path.realpath(run_dir).rstrip(os.sep) + os.sep
    if os.path.realpath(path).startswith(run):  # (a new file too: it is foreign to the run)
        raise AutobuildError(f"--csv {path!r} is in RUN {run_dir!r}, which this command "
                             "reads; give a path outside it")
    if os.path.exists(path):  # --force replaces a CSV of one's own, nothing autobuild keeps
        name = os.path.basename(path)
        if name in OUTPUT_FILES and not name.endswith(".csv"):
            raise AutobuildError(f"--csv {path!r} is a file autobuild wrote ({name}), not a "
                                 "CSV; --force replaces only a CSV")
    holder = output_holding(os.path.dirname(os.path.abspath(path)), levels=1)
    if holder is not None:  # (another run's metrics.csv, or a file foreign to its --force)
        raise AutobuildError(f"--csv {path!r} is in {holder[1]} ({holder[0]!r}); give a path "
                             "outside it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise AutobuildError(f"--csv {path!r}: {parent!r} is not a writable directory")
