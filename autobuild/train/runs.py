"""Run directories: what a run recorded (``train.yaml``) and the data it trained on."""

from __future__ import annotations

import os
from typing import Any

from autobuild.errors import AutobuildError
from autobuild.train.data import DATA_SPECS, Data, build_data

__all__ = ["RUN_FILE", "data_for_run", "is_main_process", "read_run_record"]

RUN_FILE = "train.yaml"


def read_run_record(run: str) -> dict[str, Any] | None:
    """The ``train.yaml`` record of a run directory (None for a directory `convert` wrote)."""
    import yaml

    try:
        with open(os.path.join(run, RUN_FILE)) as f:
            record = yaml.safe_load(f)
        return record if isinstance(record, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def data_for_run(spec: str | None, record: dict[str, Any] | None, *,
                 data_dir: str | None = None, download: bool = False,
                 image_size: int | None = None, train_subset: int | None = None) -> Data:
    """The data ``spec`` names, else the data a run recorded (same crop size and subset)."""
    spec = spec or (record or {}).get("spec")
    if not spec:
        raise AutobuildError(f"--data is required ({DATA_SPECS})")
    data_dir = data_dir or (record or {}).get("data_dir")
    same = bool(record) and spec == record.get("spec")
    if image_size is None and same:
        image_size = record["input_size"][1]
    if train_subset is None and same:
        train_subset = record.get("train_subset")  # a resumed run trains on the same images
    return build_data(spec, data_dir, download=download,
                      image_size=image_size if spec.startswith("imagefolder:") else None,
                      train_subset=train_subset)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that writes and reports."""
    return int(os.environ.get("RANK", "0")) == 0
