"""TensorBoard logging for ``train --tensorboard DIR`` (rank 0 only).

Every epoch: the epoch's metrics as scalars (``train/…``, ``val/…``, ``run/…``). Every
``--tensorboard-every`` epochs and at the last: the analysis of
:mod:`autobuild.train.analyze` on one validation batch — per layer, a histogram of the
outputs (``activation/<layer>``) and of each weight term (``weight/<layer>/<term>``: a
quadratic layer's first- and second-order terms apart), and the gradient norm
(``grad_norm/<layer>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobuild.errors import AutobuildError

__all__ = ["TensorBoardLogger", "check_log_dir"]

_GROUPS = {"train_": "train/", "val_": "val/", "map": "val/"}


def check_log_dir(log_dir: str | None, key: str = "--tensorboard",
                  run_dir: str | None = None) -> None:
    """Refuse, before any work (and before a run's record is written), a ``--tensorboard``
    path (``key`` names it) that cannot become a log directory, that is or lies in the new
    run's ``run_dir`` (its event files would be foreign to the run: a later ``--force`` is
    refused, or would delete them), or a missing tensorboard package."""
    if log_dir is None:
        return
    import importlib.util
    import os

    if run_dir is not None:
        run = os.path.realpath(run_dir)
        log = os.path.realpath(log_dir)
        if log == run or log.startswith(run.rstrip(os.sep) + os.sep):
            raise AutobuildError(f"{key} {log_dir!r} is {'' if log == run else 'inside '}the "
                                 f"run directory {run_dir!r}; give a directory beside the run "
                                 "(e.g. runs/tb)")

    from autobuild.files import output_holding

    holder = output_holding(log_dir)
    if holder is not None:  # another run, model, analysis or report
        where = "" if holder[0] == os.path.abspath(log_dir) else "inside "
        raise AutobuildError(f"{key} {log_dir!r} is {where}{holder[1]} ({holder[0]!r}); its "
                             "event files would be foreign to it: give a directory of its "
                             "own (e.g. runs/tb)")
    if importlib.util.find_spec("tensorboard") is None:
        raise AutobuildError(f"{key} needs the tensorboard package: pip install "
                             "'autobuild[analysis]'")
    probe = os.path.abspath(log_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(log_dir) and not os.path.isdir(probe):
        raise AutobuildError(f"{key} {log_dir!r}: exists and is not a directory")
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise AutobuildError(f"{key} {log_dir!r}: {probe!r} is not a writable "
                             "directory")
    _try_to_write(probe, f"{key} {log_dir!r}")


def _try_to_write(folder: str, what: str) -> None:
    """Make and remove a uniquely named folder in ``folder``, the deepest part of the path
    that exists: what ``os.access`` does not see (a read-only file system, /proc, root's
    rights) is refused now, not when the first epoch ends. (A unique name: ranks and
    workers check the same path at once, and nothing of the path itself is made.)"""
    import os
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autobuild-probe-", dir=folder))
    except OSError as exc:
        raise AutobuildError(f"{what}: cannot create folders in {folder!r} "
                             f"({exc.strerror or exc})") from None


class TensorBoardLogger:
    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise AutobuildError("--tensorboard needs the tensorboard package: pip install "
                                 "'autobuild[analysis]'") from exc
        try:
            self.writer = SummaryWriter(log_dir)
        except OSError as exc:
            raise AutobuildError(f"--tensorboard {log_dir!r}: {exc.strerror}") from exc

    def scalars(self, metrics: Any) -> None:
        values = metrics.to_dict()
        epoch = int(values.pop("epoch"))
        for key, value in values.items():
            group = next((g for prefix, g in _GROUPS.items() if key.startswith(prefix)), "run/")
            name = key.removeprefix("train_").removeprefix("val_")
            self.writer.add_scalar(group + name, value, epoch)

    def histograms(self, model: nn.Module, task: str, batches: Sequence[Any], epoch: int,
                   device: torch.device) -> None:
        from autobuild.train.analyze import collect

        analysis = collect(model, task, batches, device=device)
        for s in analysis.layers:
            self._histogram(f"activation/{s.layer}", s.sample, epoch)
            if s.grad_norm_mean == s.grad_norm_mean:  # not NaN: the layer has parameters
                self.writer.add_scalar(f"grad_norm/{s.layer}", s.grad_norm_mean, epoch)
        for t in analysis.terms:
            self._histogram(f"weight/{t.layer}/{t.term}", t.values, epoch)

    def _histogram(self, tag: str, values: Any, epoch: int) -> None:
        # Only the finite values: a layer that overflowed (the very thing worth seeing)
        # must not stop the run; its scalar statistics show the inf / NaN.
        if values is None:
            return
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v):
            self.writer.add_histogram(tag, v, epoch)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
