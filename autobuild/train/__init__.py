"""Training and evaluation of (converted) networks, as a library and as CLI commands.

    >>> from autobuild.train import TrainConfig, build_data, train
    >>> data = build_data("cifar10", "~/data")
    >>> result = train(model, data, TrainConfig(epochs=30), callback=lambda m: m.val_top1 > 20)

The callback receives each epoch's :class:`EpochMetrics`; returning False stops the run
(a search prunes weak trials this way). A non-finite loss raises :class:`DivergedError`.
"""

from __future__ import annotations

from autobuild.train.checkpoint import load_checkpoint, prepare_run_dir
from autobuild.train.config import TrainConfig
from autobuild.train.data import Data, build_data
from autobuild.train.loop import (
                                  BEST_WEIGHTS,
                                  LAST_WEIGHTS,
                                  Callback,
                                  DivergedError,
                                  Result,
                                  evaluate,
                                  train,
)
from autobuild.train.metrics import EpochMetrics

__all__ = [
    "BEST_WEIGHTS",
    "LAST_WEIGHTS",
    "Callback",
    "Data",
    "DivergedError",
    "EpochMetrics",
    "Result",
    "TrainConfig",
    "build_data",
    "evaluate",
    "load_checkpoint",
    "prepare_run_dir",
    "train",
]
