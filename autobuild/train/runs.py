"""The data a run trained on, and which task (classification or detection) a model and a
data spec make. What a run records about itself is :mod:`autobuild.train.rundir`."""

from __future__ import annotations

import os
from typing import Any

from autobuild.errors import AutobuildError
from autobuild.train.data import DATA_SPECS, build_data

__all__ = ["absolute_data", "check_classes", "data_for_run", "data_paths", "is_main_process",
           "task_for"]


def task_for(model: str, spec: str | None) -> str:
    """"detection" for a registry detector, else "classification"; a detector with
    classification data (or the reverse) is a one-line error."""
    from autobuild.train.detection_data import DETECTION_SPECS, is_detection_spec

    try:
        from autobuild.models import get_model_entry

        detector = get_model_entry(model).source == "detection"
    except AutobuildError:
        detector = False  # a custom baseline: a classifier unless the data says otherwise
        if is_detection_spec(spec):
            return "detection"
    if spec and detector != is_detection_spec(spec):
        if detector:
            raise AutobuildError(f"{model} is a detector and {spec!r} is classification data; "
                                 f"give detection data: {DETECTION_SPECS}")
        raise AutobuildError(f"{spec!r} is detection data and {model} is a classifier; train "
                             "a detector (ssd300_vgg16, ssdlite320_mobilenet_v3_large) on it")
    return "detection" if detector else "classification"


def _folder(name: str, arg: str) -> tuple[str, list[str]]:
    """(the folder, the options) of an ``imagefolder:``/``voc:``/``coco:`` spec's argument."""
    parts, options = arg.split(","), []
    while name != "imagefolder" and len(parts) > 1 and "=" in parts[-1]:
        options.insert(0, parts.pop())  # voc:PATH,train=...,val=...
    return os.path.abspath(os.path.expanduser(",".join(parts))), options


def absolute_data(spec: str, data_dir: str | None) -> tuple[str, str | None]:
    """The data spec and folder with absolute paths: what a run records must name the same
    files from any working directory (``evaluate``/``--resume``/``analyze`` elsewhere)."""
    name, sep, arg = spec.partition(":")
    if name in ("imagefolder", "voc", "coco") and arg:
        path, options = _folder(name, arg)
        spec = f"{name}{sep}{','.join([path, *options])}"
    if name in ("cifar10", "cifar100") and not arg:
        data_dir = data_dir or "data"  # build_data's default, relative to where it runs
    if data_dir:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return spec, data_dir


def data_paths(spec: str | None, data_dir: str | None = None) -> list[str]:
    """The folders a data spec reads: what an output replaced with --force must not hold."""
    if not spec:
        return []
    name, _, arg = spec.partition(":")
    paths = [_folder(name, arg)[0]] if name in ("imagefolder", "voc", "coco") and arg else []
    return paths + [absolute_data(spec, data_dir)[1] or ""]


def data_for_run(spec: str | None, record: dict[str, Any] | None, *,
                 data_dir: str | None = None, download: bool = False,
                 image_size: int | None = None, train_subset: int | None = None,
                 augment: str | None = None, val_only: bool = False) -> Any:
    """The data ``spec`` names, else the data a run recorded (same crop size and subset;
    for detection data, the same training augmentation unless ``augment`` is given).
    ``val_only`` (evaluation) reads the val split alone where the layout allows it.
    Returns a :class:`~autobuild.train.data.Data` or, for a detection spec, a
    :class:`~autobuild.train.detection_data.DetectionData`."""
    from autobuild.train.detection_data import build_detection_data, is_detection_spec

    spec = spec or (record or {}).get("spec")
    if not spec:
        raise AutobuildError(f"--data is required ({DATA_SPECS})")
    if data_dir and spec.partition(":")[0] not in ("cifar10", "cifar100"):
        raise AutobuildError(f"--data-dir {data_dir!r}: it is where CIFAR's batches are; "
                             f"{spec!r} does not read it")
    if download and spec.partition(":")[0] not in ("cifar10", "cifar100"):
        raise AutobuildError(f"--download fetches CIFAR; {spec!r} is not downloaded")
    spec, data_dir = absolute_data(spec, data_dir or (record or {}).get("data_dir"))
    same = bool(record) and spec == record.get("spec")
    if is_detection_spec(spec):
        if train_subset is None and same and not val_only:
            train_subset = record.get("train_subset")
        augment = augment or (record or {}).get("augment") or "ssd"
        data = build_detection_data(spec, data_dir, augment=augment,
                                    train_subset=train_subset, val_only=val_only)
        check_classes(data, record)
        return data
    if augment is not None:
        raise AutobuildError("--augment chooses a detection augmentation; "
                             f"{spec!r} is classification data")
    if image_size is None and same and record.get("input_size") and \
            spec.startswith("imagefolder:"):
        image_size = record["input_size"][1]
    if train_subset is None and same and not val_only:
        train_subset = record.get("train_subset")  # a resumed run trains on the same images
    data = build_data(spec, data_dir, download=download,
                      image_size=image_size,
                      train_subset=train_subset, val_only=val_only)
    check_classes(data, record)
    return data


def check_classes(data: Any, record: dict[str, Any] | None) -> None:
    """Refuse data whose classes are not those the run trained on, by count or by name in
    order: scored against reordered or renamed labels, its accuracy or mAP would be
    wrong without any error. (Runs recorded before the names were kept: the count alone.)"""
    if not record:
        return
    where = f"the run trained on {record.get('spec')}"
    names = record.get("classes")
    background = data.num_classes - len(data.classes)  # 1 for a detector, else 0
    trained = len(names) if names is not None else (
        record["num_classes"] - background if record.get("num_classes") else None)
    if trained is not None and trained != len(data.classes):
        n = len(data.classes)
        raise AutobuildError(f"{data.spec} has {n} class{'es' if n != 1 else ''} and {where}, "
                             f"which has {trained}: the model's outputs would not be its "
                             "classes")
    if names is not None and list(data.classes) != list(names) and \
            not (_unnamed(names) or _unnamed(data.classes)):
        k = next(i for i, (a, b) in enumerate(zip(data.classes, names, strict=True)) if a != b)
        # (named by the label the model outputs: 0-based, after a detector's background)
        raise AutobuildError(f"{data.spec} names its classes differently from {where}: label "
                             f"{k + background} is {data.classes[k]!r} here and {names[k]!r} "
                             f"there (the labels would be scored against the wrong classes)")


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that writes and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def _unnamed(names: Any) -> bool:
    """Classes known by number only ("0", "1", ...: synthetic data, a CIFAR folder without
    its batches.meta): no names to compare."""
    return list(names) == [str(i) for i in range(len(names))]
