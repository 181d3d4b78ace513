"""Detection data: ``voc:PATH``, ``coco:PATH`` and ``synthetic-detection``, with the SSD
augmentation of torchvision's detection reference scripts.

Every annotation is read and checked when the data is built, so a malformed file (bad XML
or JSON, a box with x2 < x1, a missing image, an unknown class) fails at once, in one line
that names it, rather than in a data-loader worker hours into a run.

Samples are ``(image, target)``: a float CxHxW image in [0, 1] at its own size (the SSD
models resize and normalise it themselves) and ``{"boxes": (N, 4) x1y1x2y2 pixels,
"labels": (N,) int64 in 1..K}``, plus ``"iscrowd": (N,) int64`` in the validation split
(training leaves those objects out); label 0 is the background, so a detector for K
classes is built with ``num_classes = K + 1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from autobuild.errors import AutobuildError
from autobuild.train.detection_readers import (
    Record,
    check_size,
    read_coco,
    read_voc,
    voc_classes,
)

__all__ = ["AUGMENTATIONS", "DETECTION_SPECS", "VOC_CLASSES", "DetectionData",
           "DetectionDataset", "build_detection_data", "collate_detection",
           "is_detection_spec", "synthetic_detection_sample"]

DETECTION_SPECS = ("voc:PATH[,train=SPLIT,val=SPLIT], coco:PATH or "
                   "synthetic-detection[:size=N,classes=N,train=N,val=N,seed=N]")
#: The Pascal VOC classes; ``voc:PATH`` annotations must use these names (or those of a
#: ``classes.txt`` beside ``Annotations/``, one per line, for a VOC-format set of others).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
#: Shapes drawn by ``synthetic-detection``, one class each.
SYNTHETIC_CLASSES = ("rectangle", "ellipse", "triangle", "cross")
#: Training augmentations of torchvision's references/detection (``--augment``).
AUGMENTATIONS = ("ssd", "ssdlite", "hflip", "none")
_MEAN_FILL = (123, 117, 104)  # ImageNet mean in 0..255: what SSD's zoom-out pads with


@dataclass
class DetectionData:
    """Train/val detection datasets and their foreground class names."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    spec: str = ""
    data_dir: str | None = None
    train_subset: int | None = None
    augment: str = "ssd"

    @property
    def num_classes(self) -> int:
        """What the detector is built with: the classes plus the background."""
        return len(self.classes) + 1


def is_detection_spec(spec: str | None) -> bool:
    return bool(spec) and spec.partition(":")[0] in ("voc", "coco", "synthetic-detection")


def build_detection_data(spec: str, data_dir: str | None = None, *, augment: str = "ssd",
                         train_subset: int | None = None, val_only: bool = False
                         ) -> DetectionData:
    """Read (and check) the data a detection spec names; errors are AutobuildErrors.

    ``val_only`` reads the val split alone (evaluation: VOC2007's test archive, for one,
    holds no train split); the train dataset is then empty."""
    if augment not in AUGMENTATIONS:
        raise AutobuildError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, "
                             f"got {augment!r}")
    name, _, arg = spec.partition(":")
    splits = ("val",) if val_only else ("train", "val")
    if name == "voc" and arg:
        path, opts = _path_and_options(arg, {"train": "train", "val": "val"})
        root = os.path.expanduser(path)
        classes = voc_classes(root, VOC_CLASSES)
        voc = {s: read_voc(root, opts[s], classes, role=s) for s in splits}
        train, val = voc.get("train", []), voc["val"]
    elif name == "coco" and arg:
        path, opts = _path_and_options(arg, {"train": "train", "val": "val"})
        root = os.path.expanduser(path)
        coco = {s: read_coco(root, opts[s]) for s in splits}
        val, classes = coco["val"]
        train, train_classes = coco.get("train", ([], classes))
        if train_classes != classes:
            diff = next((f"category {k + 1} is {a!r} in train and {b!r} in val" for k, (a, b)
                         in enumerate(zip(train_classes, classes, strict=False)) if a != b),
                        f"{len(train_classes)} in train, {len(classes)} in val")
            raise AutobuildError(f"coco:{path}: the train and val annotations list different "
                                 f"categories ({diff})")
    elif name == "synthetic-detection":
        return _synthetic(spec, arg, augment, None if val_only else train_subset)
    else:
        raise AutobuildError(f"unknown detection data spec {spec!r}; valid: {DETECTION_SPECS}")
    # Training needs something to learn from in each image; evaluation keeps every image
    # (detections on an image without objects are false positives).
    train = [r for r in train if (~r.crowd).any()]
    if not train and not val_only:
        raise AutobuildError(f"{spec}: no training image has a (non-difficult) object")
    if not val:
        raise AutobuildError(f"{spec}: the validation split has no image")
    if not any((~r.crowd).any() for r in val):  # mAP is undefined (it read as -1)
        raise AutobuildError(f"{spec}: the validation split has no (non-difficult) object "
                             "to evaluate against")
    train = train if val_only else _subset(train, train_subset)
    _check_headers(train + val)
    return DetectionData(name, DetectionDataset(train, ssd_transform(augment)),
                         DetectionDataset(val, None), classes, spec, data_dir, train_subset,
                         augment)


#: Images whose headers are read before training (spread over the set): a set resized
#: after annotating is refused up front; every image is checked again when it is loaded.
HEADER_SAMPLES = 256


def _check_headers(records: list[Record]) -> None:
    from PIL import Image

    step = max(1, len(records) // HEADER_SAMPLES)
    for r in records[::step]:
        try:
            with Image.open(r.image) as img:
                check_size(r, *img.size)
        except OSError as exc:  # includes PIL's UnidentifiedImageError
            raise AutobuildError(f"cannot read image {r.image!r}: "
                                 f"{str(exc).splitlines()[0]}") from None


def _path_and_options(arg: str, defaults: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``PATH,key=value,...``: trailing options split off the path."""
    opts, given = dict(defaults), set()
    parts = arg.split(",")
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key not in defaults or not value:
            raise AutobuildError(f"bad data option {key}={value!r}; valid: {DETECTION_SPECS}")
        if key in given:
            raise AutobuildError(f"data option {key} is given twice in {arg!r}")
        opts[key] = value
        given.add(key)
    return ",".join(parts), opts


def _subset(records: list[Record], n: int | None) -> list[Record]:
    if n is None:
        return records
    if not 1 <= n <= len(records):
        raise AutobuildError(f"--train-subset must be in 1..{len(records)}, got {n}")
    keep = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
    return [records[i] for i in sorted(keep[:n].tolist())]


# ---- datasets and transforms ------------------------------------------------------------
def ssd_transform(augment: str) -> Callable[..., Any] | None:
    """torchvision's references/detection training presets ("ssd": photometric distortion,
    zoom out, IoU crop, flip; "ssdlite": IoU crop, flip), on uint8 tv_tensors."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    ops: list[Any] = []
    if augment == "ssd":
        ops += [T.RandomPhotometricDistort(),
                T.RandomZoomOut(fill={tv_tensors.Image: _MEAN_FILL, "others": 0})]
    if augment in ("ssd", "ssdlite"):
        ops.append(T.RandomIoUCrop())
    if augment != "none":
        ops.append(T.RandomHorizontalFlip())
    # Crops and zooms can leave boxes empty or outside the image: drop those.
    ops += [T.ClampBoundingBoxes(), T.SanitizeBoundingBoxes()]
    return T.Compose(ops)


class DetectionDataset(Dataset):
    """Checked annotation records + a training transform (None: evaluation, no change)."""

    def __init__(self, records: Sequence[Record], transform: Callable[..., Any] | None,
                 render: Callable[[Record], np.ndarray] | None = None) -> None:
        self.records, self.transform, self.render = list(records), transform, render

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, r: Record) -> torch.Tensor:
        if self.render is not None:
            pixels = self.render(r)
        else:
            from PIL import Image  # torchvision.io's decoders are deprecated since 0.29

            try:
                with Image.open(r.image) as img:
                    check_size(r, *img.size)
                    pixels = np.array(img.convert("RGB"))
            except OSError as exc:  # includes PIL's UnidentifiedImageError
                raise AutobuildError(f"cannot decode image {r.image!r}: "
                                     f"{str(exc).splitlines()[0]}") from exc
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from torchvision import tv_tensors

        r = self.records[i]
        image = self._image(r)
        boxes, labels, crowd = r.boxes, r.labels, r.crowd
        if self.transform is not None:  # training: difficult / crowd objects are left out
            boxes, labels = boxes[~crowd], labels[~crowd]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32),
                                                    format="XYXY",
                                                    canvas_size=tuple(image.shape[-2:])),
                  "labels": torch.as_tensor(labels, dtype=torch.int64)}
        img = tv_tensors.Image(image)
        if self.transform is not None:  # SanitizeBoundingBoxes drops boxes and their labels
            img, target = self.transform(img, target)
        else:  # evaluation: COCO ignores crowd / difficult objects
            target["iscrowd"] = torch.as_tensor(crowd, dtype=torch.int64)
        return (img.as_subclass(torch.Tensor).float() / 255,
                {k: v.as_subclass(torch.Tensor) for k, v in target.items()})


def collate_detection(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Images differ in size: a batch is a list of images and a list of targets."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# ---- synthetic-detection ------------------------------------------------------------------
def synthetic_detection_sample(index: int, *, size: int = 128, classes: int = 3, seed: int = 0
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One generated image (uint8 HxWx3) with 1-3 shapes in random colours on noise, their
    boxes (N, 4, x1y1x2y2) and labels (N,) in 1..classes (the shape: rectangle, ellipse,
    triangle, cross). The same (index, seed) always gives the same sample."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    pixels = rng.normal(110, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        x2, y2 = x1 + w, y1 + h
        label = int(rng.integers(classes))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if label == 0:
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
        elif label == 1:
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
        elif label == 2:
            draw.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=colour)
        else:
            draw.rectangle((x1 + w // 3, y1, x2 - 1 - w // 3, y2 - 1), fill=colour)
            draw.rectangle((x1, y1 + h // 3, x2 - 1, y2 - 1 - h // 3), fill=colour)
        boxes.append((x1, y1, x2, y2))
        labels.append(label + 1)
    return (np.array(image), np.asarray(boxes, dtype=np.float32),
            np.asarray(labels, dtype=np.int64))


@dataclass(frozen=True)
class _Renderer:
    """Draws a synthetic record's image on demand (a class, so loader workers can pickle it)."""

    size: int
    classes: int
    seed: int

    def __call__(self, r: Record) -> np.ndarray:
        return synthetic_detection_sample(int(r.image), size=self.size, classes=self.classes,
                                          seed=self.seed)[0]


def _synthetic(spec: str, arg: str, augment: str, train_subset: int | None) -> DetectionData:
    opts = {"size": "128", "classes": "3", "train": "64", "val": "32", "seed": "0"}
    given: set[str] = set()
    for pair in filter(None, arg.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in opts:
            raise AutobuildError(f"bad synthetic-detection option {pair!r}; valid: "
                                 f"{DETECTION_SPECS}")
        if key in given:
            raise AutobuildError(f"synthetic-detection option {key} is given twice in "
                                 f"{arg!r}")
        opts[key] = value
        given.add(key)
    try:
        size, classes, n_train, n_val, seed = (int(opts[k]) for k in
                                               ("size", "classes", "train", "val", "seed"))
    except ValueError:
        raise AutobuildError(f"bad synthetic-detection options {arg!r}; valid: "
                             f"{DETECTION_SPECS}") from None
    if not 16 <= size <= 4096 or not 1 <= classes <= len(SYNTHETIC_CLASSES) or \
            not 1 <= min(n_train, n_val) <= max(n_train, n_val) <= 100_000 or seed < 0:
        raise AutobuildError(f"bad synthetic-detection options {arg!r}: size in 16..4096, "
                             f"classes in 1..{len(SYNTHETIC_CLASSES)}, train and val in "
                             "1..100000, seed >= 0")

    def records(first: int, n: int) -> list[Record]:
        out = []
        for i in range(first, first + n):
            _, boxes, labels = synthetic_detection_sample(i, size=size, classes=classes,
                                                          seed=seed)
            out.append(Record(str(i), boxes, labels, np.zeros(len(labels), dtype=bool)))
        return out

    render = _Renderer(size, classes, seed)
    train = _subset(records(0, n_train), train_subset)
    val = records(n_train, n_val)  # other indices: no image is in both splits
    return DetectionData("synthetic-detection",
                         DetectionDataset(train, ssd_transform(augment), render),
                         DetectionDataset(val, None, render), list(SYNTHETIC_CLASSES[:classes]),
                         spec, None, train_subset, augment)
