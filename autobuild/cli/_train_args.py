"""The flags of ``autobuild train`` (shared with evaluate and importance): the data and
the training recipe, each typed and bounded by :class:`autobuild.train.TrainConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from autobuild.cli._common import IMAGE_SIZE, PATH, POSITIVE_INT

__all__ = ["add_data_arguments", "add_recipe_arguments", "config_overrides"]

_S = argparse.SUPPRESS  # absent flags stay absent: a resumed run keeps its saved recipe


def add_data_arguments(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """--data and its companions; ``training=False`` (evaluate) leaves out the flags that
    only shape the train split."""
    from autobuild.train.data import DATA_SPECS
    from autobuild.train.detection_data import AUGMENTATIONS, DETECTION_SPECS

    p.add_argument("--data", default=None, type=PATH,
                   help=f"classification: {DATA_SPECS}; detection: {DETECTION_SPECS}")
    p.add_argument("--data-dir", default=None, type=PATH,
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is missing")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None,
                   help="imagefolder crop size (default: the images' own size up to 64, else "
                        "224); for a detector, the size it resizes its inputs to (default its "
                        "own: 300 or 320)")
    if not training:
        return
    p.add_argument("--train-subset", type=POSITIVE_INT, default=None, metavar="N",
                   help="train on a fixed random subset of N images (val stays whole)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="detection training augmentation (torchvision's references): ssd = "
                        "photometric distortion, zoom out, IoU crop, flip; ssdlite = IoU crop, "
                        "flip (default: ssd for ssd300_vgg16, ssdlite for ssdlite320)")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per recipe field; each parses and bounds its value with the field's schema
    (:meth:`TrainConfig.flag_type`), so a bad value is refused before any work."""
    from autobuild.train import TrainConfig

    def typed(name: str) -> Any:
        return TrainConfig.flag_type(name)

    g = p.add_argument_group("recipe (classifier defaults: " + ", ".join(
        f"{k}={TrainConfig.default(k)}" for k in ("epochs", "batch_size", "optimizer",
                                                   "warmup_epochs", "clip_grad"))
        + "; detectors default to torchvision's detection recipe, see "
        "autobuild.train.detection.DETECTION_RECIPES)")
    g.add_argument("--epochs", type=typed("epochs"), default=_S, help="training epochs (>= 1)")
    g.add_argument("--batch-size", type=typed("batch_size"), default=_S,
                   help="per process (per GPU)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=_S, help="optimizer")
    g.add_argument("--lr", type=typed("lr"), default=_S,
                   help="peak lr > 0 (default 0.1 SGD / 1e-3 AdamW, times the batch a step "
                        "sees / 128: --batch-size, or the training set when smaller)")
    g.add_argument("--momentum", type=typed("momentum"), default=_S,
                   help="SGD momentum in [0, 1) (default 0.9)")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=_S,
                   help="plain momentum instead of Nesterov's")
    g.add_argument("--weight-decay", type=typed("weight_decay"), default=_S,
                   help="default 5e-4 SGD / 0.05 AdamW; never on norms, biases, Dirac alpha/beta")
    g.add_argument("--warmup-epochs", type=typed("warmup_epochs"), default=_S,
                   help="linear warm-up length in epochs (default 5, capped at a quarter of "
                        "the run; a larger value given is refused)")
    g.add_argument("--lr-schedule", choices=("cosine", "multistep"), default=_S,
                   help="after warm-up: cosine to zero, or x lr-gamma at each milestone")
    g.add_argument("--lr-milestones", type=typed("lr_milestones"), nargs="+", default=_S,
                   metavar="EPOCH", help="multistep epochs (default: 2/3 and 11/12 of the run)")
    g.add_argument("--lr-gamma", type=typed("lr_gamma"), default=_S,
                   help="multistep factor in (0, 1] (default 0.1)")
    g.add_argument("--label-smoothing", type=typed("label_smoothing"), default=_S,
                   help="in [0, 1)")
    g.add_argument("--cutout", type=typed("cutout"), default=_S, metavar="PIXELS",
                   help="cut a square of this side out of each training image (0 = off; "
                        "DARTS and PDE-Global use 16)")
    g.add_argument("--drop-path", type=typed("drop_path"), default=_S, metavar="RATE",
                   help="DARTS drop path in [0, 1), raised linearly from 0 over the run "
                        "(DARTS: 0.2)")
    g.add_argument("--aux-weight", type=typed("aux_weight"), default=_S,
                   help="weight of an auxiliary tower's loss in [0, 10] (default 0.4 for "
                        "cifar_darts_v2_aux; 0 = its loss counts for nothing)")
    g.add_argument("--clip-grad", type=typed("clip_grad"), default=_S,
                   help="max grad norm >= 0; auto = 0.5 for quadratic/multiplicative (10 for "
                        "detectors); 0 = off")
    g.add_argument("--amp", action="store_true", default=_S,
                   help="mixed precision (bf16 autocast by default)")
    g.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=_S,
                   help="fp16 uses a GradScaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=_S,
                   help="default: on for CUDA")
    g.add_argument("--compile", action="store_true", default=_S, help="torch.compile the model")
    g.add_argument("--ema", type=typed("ema"), default=_S, metavar="DECAY",
                   help="keep an EMA of the weights, decay in (0, 1) (e.g. 0.9999); it is "
                        "evaluated and saved")
    g.add_argument("--seed", type=typed("seed"), default=_S,
                   help="seed of weights, data order, augmentation (>= 0)")
    g.add_argument("--deterministic", action="store_true", default=_S,
                   help="deterministic algorithms (slower)")
    g.add_argument("--sync-bn", action="store_true", default=_S, help="SyncBatchNorm under DDP")
    g.add_argument("--device", type=typed("device"), default=_S,
                   help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=typed("workers"), default=_S,
                   help="data loader processes (>= 0)")
    g.add_argument("--log-interval", type=typed("log_interval"), default=_S,
                   help="steps between loss checks and progress updates (>= 1)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar or per-epoch lines (on stderr)")
    g.add_argument("--tensorboard", type=typed("tensorboard"), default=_S, metavar="DIR",
                   help="log scalars every epoch, and activation / weight / gradient "
                        "histograms every --tensorboard-every epochs, to DIR")
    g.add_argument("--tensorboard-every", type=typed("tensorboard_every"), default=_S,
                   metavar="N", help="epochs between TensorBoard histograms (default 5, and "
                                     "the last)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the user gave on the command line."""
    from autobuild.train import TrainConfig

    return {name: getattr(args, name) for name in TrainConfig.field_names()
            if hasattr(args, name)}
