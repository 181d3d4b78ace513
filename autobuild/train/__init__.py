"""Training and evaluation of (converted) networks, as a library and as CLI commands.

    >>> from autobuild.train import TrainConfig, build_data, train
    >>> data = build_data("cifar10", "~/data")
    >>> result = train(model, data, TrainConfig(epochs=30), callback=lambda m: m.val_top1 > 20)

The callback receives each epoch's :class:`EpochMetrics`; returning False stops the run
(a search prunes weak trials this way). A non-finite loss raises :class:`DivergedError`.

Detectors (SSD with a converted backbone) train the same way on detection data:

    >>> data = build_detection_data("voc:~/data/VOCdevkit/VOC2007")
    >>> result = train_detection(model, data, detection_config("ssd300_vgg16", epochs=120))
"""

from __future__ import annotations

from autobuild.train.checkpoint import load_checkpoint
from autobuild.train.config import TrainConfig
from autobuild.train.data import Data, build_data
from autobuild.train.detection import (
    DetectionResult,
    detection_config,
    evaluate_detection,
    train_detection,
)
from autobuild.train.detection_data import (
    VOC_CLASSES,
    DetectionData,
    build_detection_data,
    synthetic_detection_sample,
)
from autobuild.train.loop import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    Callback,
    DivergedError,
    Result,
    evaluate,
    train,
)
from autobuild.train.metrics import DetectionEpochMetrics, EpochMetrics
from autobuild.train.rundir import prepare_run_dir, read_run_record

__all__ = [
    "BEST_WEIGHTS",
    "LAST_WEIGHTS",
    "Callback",
    "VOC_CLASSES",
    "Data",
    "DetectionData",
    "DetectionEpochMetrics",
    "DetectionResult",
    "DivergedError",
    "EpochMetrics",
    "Result",
    "TrainConfig",
    "build_data",
    "build_detection_data",
    "detection_config",
    "evaluate",
    "evaluate_detection",
    "load_checkpoint",
    "prepare_run_dir",
    "read_run_record",
    "synthetic_detection_sample",
    "train",
    "train_detection",
]
