"""``autobuild analyze``'s library half: measure a saved run (and optionally a second one,
on the very same batches) and write the CSV files and plots of
:mod:`autobuild.train.analyze`."""

from __future__ import annotations

import os
from typing import Any

import torch

from autobuild.errors import AutobuildError, in_context

__all__ = ["analyze_run"]


def _model(run: str, task: str, data: Any, weights_name: str, flag: str = "") -> Any:
    """The run's model, fitted to ``data``; an error names ``flag``, the option that gave
    ``run`` (``--compare``)."""
    try:
        return _fitted_model(run, task, data, weights_name)
    except AutobuildError as exc:
        if not flag:
            raise
        raise in_context(exc, f"{flag} {run}: {exc}") from exc


def _fitted_model(run: str, task: str, data: Any, weights_name: str) -> Any:
    from autobuild.io import load
    from autobuild.rewrite import plan_of
    from autobuild.train.runs import task_for
    from autobuild.train.runtime import check_finite

    model = load(run, weights_name=weights_name)
    check_finite(model, f"the weights in {os.path.join(run, weights_name)!r}")
    if task_for(plan_of(model).model, data.spec) != task:
        raise AutobuildError(f"{run} is not a {task} model like the first run")
    if task == "detection":
        from autobuild.train.detection import check_detector, prepare_detector

        check_detector(model, data)
        prepare_detector(model)
    else:
        from autobuild.train.loop import check_fits

        check_fits(model, data)
    return model


def analyze_run(run: str, out_dir: str, *, data: str | None = None,
                data_dir: str | None = None, compare: str | None = None, batches: int = 4,
                batch_size: int = 16, device: str = "auto", workers: int | None = 0,
                saturation: float = 6.0, last: bool = False, plots: bool = True,
                force: bool = False) -> dict[str, Any]:
    """Analyse ``run`` on the first ``batches`` val batches of ``data`` (default: the data
    the run trained on) into ``out_dir``; with ``compare``, analyse that run on the same
    batches into ``out_dir/compare/`` and write ``compare.csv`` / ``compare.png``."""
    from autobuild.files import ensure_writable_dir, staged_directory
    from autobuild.io import load_plan
    from autobuild.train.analyze import collect
    from autobuild.train.analyze_files import write_analysis, write_comparison
    from autobuild.train.config import TrainConfig
    from autobuild.train.detection_data import collate_detection
    from autobuild.train.distributed import Dist
    from autobuild.train.loop import BEST_WEIGHTS, LAST_WEIGHTS
    from autobuild.train.rundir import read_run_record
    from autobuild.train.runs import check_classes, data_for_run, data_paths, task_for
    from autobuild.train.runtime import make_loader
    from autobuild.train.session import resolve_device

    if batches < 1 or batch_size < 1:
        raise AutobuildError("--batches and --batch-size must be at least 1")
    weights = LAST_WEIGHTS if last else BEST_WEIGHTS
    if not os.path.isdir(run):
        raise AutobuildError(f"{run!r} is not a saved model directory")
    if compare and not os.path.isdir(compare):
        raise AutobuildError(f"--compare {compare!r} is not a saved model directory")
    record = (read_run_record(run) or {}).get("data")
    recorded = {} if data else record or {}  # (the data it will read)
    folders = data_paths(data or recorded.get("spec"), data_dir or recorded.get("data_dir"))
    # --out: a file, not empty without --force; with it, never what it reads (the runs, the
    # data) nor the directory it runs in
    ensure_writable_dir(out_dir, force=force, keep=[run, compare or "", *folders],
                        writes="analysis")
    task = task_for(load_plan(run).model, data or (record or {}).get("spec"))
    dataset = data_for_run(data, record, data_dir=data_dir)
    if compare:  # measured on the same batches: they must be its classes too
        try:
            check_classes(dataset, (read_run_record(compare) or {}).get("data"))
        except AutobuildError as exc:
            raise AutobuildError(f"--compare {compare}: {exc}") from None
    cfg = TrainConfig(batch_size=batch_size, device=device, workers=workers)
    dev = resolve_device(cfg.device)
    loader = make_loader(dataset.val, cfg, dev, Dist(), False,
                         collate_detection if task == "detection" else None)
    chosen = []
    for batch in loader:
        chosen.append(batch)
        if len(chosen) == batches:
            break
    # Both models load (and fit the data) before anything is measured or written.
    first = _model(run, task, dataset, weights)
    second = _model(compare, task, dataset, weights, "--compare") if compare else None
    a = collect(first.to(dev), task, chosen, device=dev, saturation=saturation)
    b = collect(second.to(dev), task, chosen, device=dev, saturation=saturation) \
        if second is not None else None
    summary: dict[str, Any] = {"run": run, "task": task, "data": dataset.spec,
                               "images": a.images, "layers": len(a.layers),
                               "sites": len(a.site_names),
                               "converted_layers": len(a.family_layers)}
    # Written whole: --force replaces an earlier analysis, it never mixes with it.
    with staged_directory(out_dir, force=force, writes="analysis") as staging:
        files = write_analysis(a, staging, plots=plots)
        if b is not None:
            files += write_analysis(b, os.path.join(staging, "compare"), plots=plots)
            labels = (os.path.basename(os.path.normpath(run)),
                      os.path.basename(os.path.normpath(compare or "")))
            files += write_comparison(a, b, staging, labels, plots=plots)
            summary["compare"] = compare
    files = [os.path.join(out_dir, os.path.relpath(f, staging)) for f in files]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    summary["files"] = files
    return summary
