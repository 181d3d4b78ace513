"""Detection training and evaluation: SSD / SSDlite whose backbone a family converted.

    >>> from autobuild.train import TrainConfig, build_detection_data, train_detection
    >>> model = autobuild.convert("ssd300_vgg16", to="quadratic", num_classes=21)
    >>> data = build_detection_data("voc:~/data/VOCdevkit/VOC2007")
    >>> result = train_detection(model, data, detection_config("ssd300_vgg16"))

The recipe is torchvision's references/detection (SGD, warm-up, multi-step or cosine; the
SSD augmentations of :mod:`autobuild.train.detection_data`), the run directory and
checkpoint are the classification loop's (:class:`~autobuild.train.session.Session`), and
the validation metric is COCO-style mAP from torchmetrics' ``MeanAveragePrecision``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from autobuild.errors import AutobuildError
from autobuild.train.config import DETECTION_CLIP_FAMILIES, TrainConfig, check_new_recipe
from autobuild.train.detection_data import (
    DetectionData,
    build_detection_data,
    collate_detection,
)
from autobuild.train.distributed import Dist
from autobuild.train.metrics import DetectionEpochMetrics
from autobuild.train.regularize import check_regularizers
from autobuild.train.runtime import (
    autocast,
    check_finite,
    make_loader,
    peak_mem_mb,
    place_model,
)
from autobuild.train.session import (
    Callback,
    Session,
    resolve_device,
)

__all__ = ["DETECTION_RECIPES", "DetectionResult", "check_detector", "check_image_size",
           "coco_map",
           "data_record", "default_augment", "detection_config", "evaluate_detection",
           "is_detector", "prepare_detector", "set_image_size", "train_detection"]

#: torchvision's references/detection recipes, for one process with batch 32 (SSD300: 8 GPUs
#: x 4 at lr 0.002, multi-step at 80 and 110 of 120 epochs; SSDlite: 8 x 24 at lr 0.15,
#: cosine over 600 epochs, scaled linearly here to 32 images). Flags override them.
#: Gradient clipping stays "auto", resolved with DETECTION_CLIP_FAMILIES: none for the
#: baselines and most families (neither the reference nor QuadraLib's VGG-SSD clips), 10 for
#: quadratic and multiplicative backbones.
DETECTION_RECIPES: dict[str, dict[str, Any]] = {
    "ssd300_vgg16": {"epochs": 120, "batch_size": 32, "lr": 0.002, "nesterov": False,
                     "weight_decay": 5e-4, "warmup_epochs": 1.0, "lr_schedule": "multistep",
                     "augment": "ssd"},
    "ssdlite320_mobilenet_v3_large": {"epochs": 600, "batch_size": 32, "lr": 0.025,
                                      "nesterov": False, "weight_decay": 4e-5,
                                      "warmup_epochs": 1.0, "lr_schedule": "cosine",
                                      "augment": "ssdlite"},
}


@dataclass
class DetectionResult:
    """What a detection run produced; ``best_map`` is the best val mAP (0..1)."""

    model: nn.Module
    history: list[DetectionEpochMetrics] = field(default_factory=list)
    best_map: float = 0.0
    best_epoch: int = 0
    stopped_early: bool = False
    out_dir: str | None = None
    seconds: float = 0.0
    #: The first epoch this call trained (after a resume: the checkpoint's + 1); ``seconds``
    #: counts from it.
    first_epoch: int = 1

    @property
    def last(self) -> DetectionEpochMetrics | None:
        return self.history[-1] if self.history else None


def is_detector(name: str) -> bool:
    """Whether the registry's baseline ``name`` is a detector (trained on detection data)."""
    from autobuild.models import get_model_entry

    return get_model_entry(name).source == "detection"


def _recipe(model: str) -> dict[str, Any]:
    return dict(DETECTION_RECIPES.get(model, DETECTION_RECIPES["ssd300_vgg16"]))


def detection_config(model: str, **overrides: Any) -> TrainConfig:
    """The training recipe for detector ``model`` (SSD300's for unknown ones), overridden."""
    recipe = _recipe(model)
    recipe.pop("augment")
    return TrainConfig.from_dict({**recipe, **overrides})


def default_augment(model: str) -> str:
    """The training augmentation the reference uses for ``model`` ("ssd" or "ssdlite")."""
    return str(_recipe(model)["augment"])


# ---- the model --------------------------------------------------------------------------
def _transform(model: nn.Module) -> Any:
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "fixed_size"):
        raise AutobuildError(f"{type(model).__name__} is not a torchvision SSD detector; "
                             "detection data trains ssd300_vgg16, ssdlite320_mobilenet_v3_large "
                             "or another registered detector")
    return transform


def set_image_size(model: nn.Module, size: tuple[int, int]) -> None:
    """Make the SSD resize its inputs to ``size`` (H, W) instead of its native size.

    SSD300's anchors are placed with strides tuned for 300x300 (8, 16, ..., 100, 300); at
    another size they are placed on the feature maps' own grid instead (torchvision's
    default when no steps are given, as SSDlite does). A size the backbone cannot take
    (SSD300's last layers need about 258 pixels) is a one-line error.
    """
    transform = _transform(model)
    size = (int(size[0]), int(size[1]))
    if tuple(transform.fixed_size or ()) == size:
        return
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        was = backbone.training
        try:
            backbone.eval()
            param = next(backbone.parameters())
            with torch.no_grad():
                backbone(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype))
        except RuntimeError as exc:
            raise AutobuildError(f"the detector cannot run at {size[0]}x{size[1]} (--image-"
                                 f"size): {str(exc).splitlines()[0]}") from exc
        finally:
            backbone.train(was)
    transform.min_size, transform.max_size, transform.fixed_size = (min(size),), max(size), size
    generator = getattr(model, "anchor_generator", None)
    if getattr(generator, "steps", None) is not None:
        generator.steps = None


def check_image_size(name: str, size: int) -> None:
    """Refuse, in one line and before any conversion, a size detector ``name`` cannot take."""
    from autobuild.models import build_model, get_model_entry

    if get_model_entry(name).input_size[1:] != (size, size):
        set_image_size(build_model(name, num_classes=2), (size, size))


def prepare_detector(model: nn.Module) -> nn.Module:
    """Set the detector's input size from its plan (the size its backbone was converted
    and counted at), so a saved run is rebuilt at the size it trained at."""
    from autobuild.rewrite import plan_of

    plan = plan_of(model)
    if plan is not None and plan.input_size is not None:
        set_image_size(model, tuple(plan.input_size[1:]))
    return model


def check_detector(model: nn.Module, data: DetectionData) -> None:
    """Fail in one line, before training, when the detector does not fit the data (or its
    weights are not finite)."""
    check_finite(model)
    _transform(model)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    # (torchvision's SSD heads keep their class count, background included, as num_columns)
    n = getattr(head, "num_classes", None) or getattr(head, "num_columns", None)
    if n is not None and n != data.num_classes:
        raise AutobuildError(f"the detector predicts {n - 1} classes (+ background) but "
                             f"{data.spec} has {len(data.classes)}: rebuild it with "
                             f"--num-classes {data.num_classes}")


# ---- evaluation -------------------------------------------------------------------------
def _map_metric() -> Any:
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as exc:
        raise AutobuildError("detection metrics need torchmetrics: pip install "
                             "'autobuild[detection]'") from exc
    for backend, module in (("faster_coco_eval", "faster_coco_eval"),
                            ("pycocotools", "pycocotools")):
        try:
            __import__(module)
        except ImportError:
            continue
        metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True,
                                      extended_summary=True, backend=backend,
                                      sync_on_compute=False)
        # COCO scores the 100 best detections per image; SSD returns up to 200-300 (the
        # rest cannot change AP much): that is the protocol, not worth a warning per call.
        metric.warn_on_many_detections = False
        return metric
    raise AutobuildError("detection metrics need faster-coco-eval or pycocotools: pip install "
                         "'autobuild[detection]'")


def coco_map(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
             classes: list[str]) -> dict[str, Any]:
    """COCO-style box mAP (0..1) of ``preds`` against ``targets`` (``iscrowd`` boxes are
    ignored), with per-class AP (IoU 0.50:0.95) and AP@0.5 keyed by class name, for the
    classes that have ground truth (AP is undefined for the others; so is the AP of an
    object size the data has no object of: None)."""
    metric = _map_metric()
    metric.update(preds, targets)
    r = metric.compute()
    out: dict[str, Any] = {k: float(r[k]) for k in ("map", "map_50", "map_75", "map_small",
                                                     "map_medium", "map_large", "mar_100")}
    for size in ("map_small", "map_medium", "map_large"):  # -1: no object of that size,
        if out[size] < 0:  # torchmetrics' mark, not a score (None: null in --json)
            out[size] = None
    # precision[iou, recall, class, area=all, max_dets=100]; -1 marks "no ground truth".
    precision = r["precision"][0, :, :, 0, -1]
    per_class = {}
    labels = r["classes"].reshape(-1).tolist()
    for k, (label, ap) in enumerate(zip(labels, r["map_per_class"].reshape(-1).tolist(),
                                        strict=True)):
        if not 1 <= label <= len(classes) or ap <= -1:
            continue  # a label the data does not have, or a class without ground truth
        per_class[classes[label - 1]] = {"ap": ap, "ap_50": float(precision[:, k].mean())}
    out["per_class"] = per_class
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device,
              dist: Dist, classes: list[str]) -> dict[str, Any]:
    model.eval()
    preds, targets = [], []
    for images, batch_targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        with autocast(cfg, device):
            out = model(images)
        preds += [{"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(),
                   "labels": o["labels"].cpu()} for o in out]
        targets += [{k: t[k] for k in ("boxes", "labels", "iscrowd")} for t in batch_targets]
    # COCO evaluation needs every image at once: rank 0 gathers, scores and shares. Rank r
    # holds images r, r + W, r + 2W...: interleaved back into the dataset's order, because
    # COCO breaks ties between equal scores by image order (an untrained SSD has many).
    shards = dist.gather((preds, targets))
    result = None
    if shards is not None:
        longest = max(len(s[0]) for s in shards)
        order = [(s, i) for i in range(longest) for s in shards if i < len(s[0])]
        result = coco_map([s[0][i] for s, i in order], [s[1][i] for s, i in order], classes)
    return dist.broadcast(result)


def evaluate_detection(model: nn.Module, data: DetectionData | str,
                       config: TrainConfig | None = None) -> dict[str, Any]:
    """COCO-style mAP, mAP@0.5, mAP@0.75 and per-class AP of ``model`` on the val split."""
    cfg = config or TrainConfig(batch_size=16)
    data = build_detection_data(data) if isinstance(data, str) else data
    check_detector(model, data)
    device = resolve_device(cfg.device)
    model = place_model(model, cfg, device)
    start = time.perf_counter()
    loader = make_loader(data.val, cfg, device, Dist(), False, collate_detection)
    result = _evaluate(model, loader, cfg, device, Dist(), data.classes)
    seconds = time.perf_counter() - start
    return {**result, "images": len(data.val), "seconds": seconds,
            "images_per_s": len(data.val) / max(seconds, 1e-9)}


# ---- training ---------------------------------------------------------------------------
def train_detection(model: nn.Module, data: DetectionData | str,
                    config: TrainConfig | None = None, *, callback: Callback | None = None,
                    out_dir: str | None = None, resume: bool = False) -> DetectionResult:
    """Train a detector on ``data``; the run directory, resume, DDP, AMP, EMA, compile and
    divergence handling are the classification loop's (:func:`autobuild.train.train`).
    The best epoch is the one with the highest val mAP; ``--compile`` compiles the backbone
    (the heads and the loss have data-dependent shapes)."""
    cfg = config or detection_config("ssd300_vgg16")
    check_regularizers(model, cfg, detection=True)
    if not resume:
        check_new_recipe(cfg)
    data = build_detection_data(data) if isinstance(data, str) else data
    check_detector(model, data)
    prepare_detector(model)
    session = Session(model, cfg, out_dir=out_dir, best_key="best_map",
                      compile_module="backbone", clip_table=DETECTION_CLIP_FAMILIES,
                      train_images=len(data.train))
    device, dist, net = session.device, session.dist, session.net
    train_loader = make_loader(data.train, cfg, device, dist, True, collate_detection)
    val_loader = make_loader(data.val, cfg, device, dist, False, collate_detection)
    steps = len(train_loader)
    if steps == 0:
        raise AutobuildError(f"{data.spec} has too few training images for one batch")
    with session:  # records how the run ended in train.yaml
        session.start(steps, resume=resume, metrics_cls=DetectionEpochMetrics,
                      data_record=data_record(data))
        session.probe = lambda: ("detection", [next(iter(val_loader))])
        for epoch in range(session.first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train_loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            net.train()
            sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, box, cls, n, bad
            bar = session.progress_bar(epoch, steps)
            for i, (images, targets) in enumerate(train_loader, 1):
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()}
                           for t in targets]
                with session.autocast():
                    losses = net(images, targets)
                box = losses.get("bbox_regression", torch.zeros((), device=device)).float()
                cls = losses.get("classification", torch.zeros((), device=device)).float()
                loss = sum(v.float() for v in losses.values())
                session.step(loss)
                d = torch.stack([loss.detach(), box.detach(), cls.detach()]).double()
                n = float(len(images))
                sums += torch.cat([d * n, d.new_tensor([n]), (~torch.isfinite(d[:1])).double()])
                if i % cfg.log_interval == 0 or i == steps:
                    tot = session.sync(sums, epoch, i, bar)
                    if bar is not None:
                        bar.set_postfix(loss=f"{tot[0] / tot[3]:.3f}",
                                        img_s=f"{tot[3] / (time.perf_counter() - t0):.1f}")
                if bar is not None:
                    bar.update()
            if bar is not None:
                bar.close()
            train_seconds = time.perf_counter() - t0
            loss_sum, box_sum, cls_sum, n, _ = dist.all_sum(sums).tolist()
            val = _evaluate(session.model_to_evaluate(), val_loader, cfg, device, dist,
                            data.classes)
            session.check_finite(epoch, **{"validation mAP": val["map"]})
            metrics = DetectionEpochMetrics(
                epoch, loss_sum / n, box_sum / n, cls_sum / n, val["map"], val["map_50"],
                val["map_75"], session.opt.param_groups[0]["lr"], n / train_seconds,
                time.perf_counter() - t0, peak_mem_mb(device))
            if session.end_epoch(metrics, metrics.map, callback):
                break
    best = session.best if math.isfinite(session.best) else 0.0
    return DetectionResult(session.eval_model, session.history, best, session.best_epoch,
                           session.stopped, out_dir, session.seconds, session.first_epoch)


def data_record(data: DetectionData) -> dict[str, Any]:
    """What a run records about its detection data (``train.yaml``, the checkpoint)."""
    return {"spec": data.spec, "data_dir": data.data_dir, "num_classes": data.num_classes,
            "classes": list(data.classes), "train_subset": data.train_subset,
            "augment": data.augment, "task": "detection"}
