"""Readers of the Pascal VOC and COCO annotation layouts, checking every record.

A reader returns :class:`Record` s: an image path, its boxes in x1y1x2y2 pixel coordinates,
labels in 1..K and an ``ignore`` flag per box (VOC's *difficult*, COCO's *iscrowd*: left out
of training, and neither rewarded nor penalised by the COCO evaluation). Any problem is an
:class:`AutobuildError` whose single line names the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autobuild.errors import AutobuildError

__all__ = ["Record", "check_size", "read_coco", "read_voc", "voc_classes", "voc_root"]


@dataclass
class Record:
    image: str
    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2
    labels: np.ndarray  # (N,) int64, 1..K
    crowd: np.ndarray  # (N,) bool: difficult / crowd, ignored by training and evaluation
    #: (width, height) the annotation declares, checked against the image when it is read
    #: (boxes of images resized after annotating would land in the wrong place)
    size: tuple[int, int] | None = None
    source: str = ""  # the annotation file, named by errors


# ---- Pascal VOC -----------------------------------------------------------------------------
def voc_root(root: str) -> str:
    """PATH itself, or the VOC2007 folder inside it (PATH may be the VOCdevkit parent)."""
    for candidate in (root, os.path.join(root, "VOC2007"),
                      os.path.join(root, "VOCdevkit", "VOC2007")):
        if os.path.isdir(os.path.join(candidate, "Annotations")):
            return candidate
    raise AutobuildError(f"voc:{root} needs the VOC2007 layout: Annotations/, JPEGImages/ and "
                         f"ImageSets/Main/{{train,val}}.txt (no Annotations/ in {root!r})")


def voc_classes(root: str, default: Sequence[str]) -> list[str]:
    """``classes.txt`` beside ``Annotations/`` (one name per line) for a VOC-format set of
    other classes; else ``default`` (the 20 Pascal VOC classes)."""
    path = os.path.join(voc_root(root), "classes.txt")
    if not os.path.exists(path):
        return list(default)
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise AutobuildError(f"{path}: cannot read: {exc}") from exc
    if not names or len(set(names)) != len(names):
        raise AutobuildError(f"{path}: needs one distinct class name per line")
    return names


def read_voc(root: str, split: str, classes: Sequence[str], role: str | None = None
             ) -> list[Record]:
    """The images listed in ``ImageSets/Main/<split>.txt`` with their annotations; ``role``
    ("train" or "val") is the data option that chose ``split``."""
    root = voc_root(root)
    role = role or split
    ids_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    try:
        with open(ids_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except OSError as exc:
        raise AutobuildError(f"voc:{root}: cannot read the {role} split {ids_file!r} "
                             f"({exc.strerror}); choose it with voc:PATH,{role}=NAME") from exc
    if not ids:
        raise AutobuildError(f"voc:{root}: the {split} split {ids_file!r} lists no image")
    index = {name: i + 1 for i, name in enumerate(classes)}
    return [_voc_record(root, image_id, index) for image_id in ids]


def _voc_record(root: str, image_id: str, index: dict[str, int]) -> Record:
    path = os.path.join(root, "Annotations", f"{image_id}.xml")
    if not os.path.exists(path):
        raise AutobuildError(f"{path}: annotation file missing (listed in the split file)")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AutobuildError(f"{path}: bad XML: {exc}") from exc
    except OSError as exc:  # a directory, no permission
        raise AutobuildError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    name = (tree.findtext("filename") or f"{image_id}.jpg").strip()
    image = os.path.join(root, "JPEGImages", name)
    if not os.path.exists(image):
        raise AutobuildError(f"{path}: image {image!r} does not exist")
    width = _number(tree, "size/width", path, required=False)
    height = _number(tree, "size/height", path, required=False)
    if (width == 0) != (height == 0) and width is not None and height is not None:
        # (0 x 0 is what some tools write for "unknown"; one side 0 is a broken file)
        raise AutobuildError(f"{path}: declares a {width:g}x{height:g} image; a size is "
                             "both sides >= 1 (or 0x0 for unknown)")
    boxes, labels, crowd = [], [], []
    for k, obj in enumerate(tree.iter("object"), 1):
        cls = (obj.findtext("name") or "").strip()
        if cls not in index:
            raise AutobuildError(f"{path}: object {k} has unknown class {cls!r}; valid: "
                                 f"{', '.join(index)}")
        x1, y1, x2, y2 = (_number(obj, f"bndbox/{t}", path, k)
                          for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise AutobuildError(f"{path}: object {k} ({cls}) has a box with xmax < xmin or "
                                 f"ymax < ymin ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
        # VOC counts pixels from 1, inclusive: pixel columns x1..x2 span [x1 - 1, x2].
        box = [x1 - 1, y1 - 1, x2, y2]
        if width and height:
            box = _inside(box, width, height, f"{path}: object {k} ({cls})")
        boxes.append(box)
        labels.append(index[cls])
        crowd.append(_number(obj, "difficult", path, k, required=False) == 1)
    return Record(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                  np.asarray(labels, dtype=np.int64), np.asarray(crowd, dtype=bool),
                  _declared(width, height), path)


def _declared(width: Any, height: Any) -> tuple[int, int] | None:
    """The size an annotation declares, when it declares a usable one (VOC files written
    by some tools say 0 x 0)."""
    if (isinstance(width, (int, float)) and isinstance(height, (int, float))
            and not isinstance(width, bool) and not isinstance(height, bool)
            and width >= 1 and height >= 1 and float(width).is_integer()
            and float(height).is_integer()):
        return int(width), int(height)
    return None


def check_size(record: Record, width: int, height: int) -> None:
    """Refuse an image whose size is not the one its annotation declares."""
    if record.size is not None and record.size != (width, height):
        raise AutobuildError(f"{record.source}: declares a {record.size[0]}x{record.size[1]} "
                             f"image but {record.image!r} is {width}x{height}; its boxes "
                             "would be misplaced (an image resized after annotating?)")


#: How far (pixels, or this fraction of the side when larger) an edge may lie outside its
#: image and be clipped: annotation tools put edges a pixel or so outside. A box reaching
#: further was drawn for another image size or is corrupt; clipping it would train on a
#: box that is not the object.
EDGE_TOLERANCE_PX, EDGE_TOLERANCE_FRACTION = 2.0, 0.01


def _inside(box: list[float], width: float, height: float, what: str) -> list[float]:
    """``box`` clipped to the image; a box with nothing inside the image, or reaching past
    it by more than a small tolerance, is refused."""
    limits = (width, height) * 2
    clipped = [min(max(v, 0.0), lim) for v, lim in zip(box, limits, strict=True)]
    shown = f"({', '.join(f'{v:g}' for v in box)} as x1, y1, x2, y2)"
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise AutobuildError(f"{what} has a box outside its {width:g}x{height:g} image {shown}")
    for v, lim in zip(box, limits, strict=True):
        slack = max(EDGE_TOLERANCE_PX, EDGE_TOLERANCE_FRACTION * lim)
        if v < -slack or v > lim + slack:
            raise AutobuildError(
                f"{what} has a box reaching past its {width:g}x{height:g} image {shown}; "
                f"an edge may lie at most {slack:g} px outside (a box drawn for another "
                "image size?)")
    return clipped


def _number(node: ET.Element, tag: str, path: str, obj: int | None = None, *,
            required: bool = True) -> float | None:
    text = node.findtext(tag)
    where = f"object {obj}'s <{tag}>" if obj else f"<{tag}>"
    if text is None or not text.strip():
        if required:
            raise AutobuildError(f"{path}: {where} is missing")
        return None
    try:
        value = float(text)
    except ValueError:
        raise AutobuildError(f"{path}: {where} is not a number: {text.strip()!r}") from None
    if not math.isfinite(value):
        raise AutobuildError(f"{path}: {where} is not a finite number: {text.strip()!r}")
    return value


# ---- COCO -----------------------------------------------------------------------------------
def _coco_files(root: str, split: str) -> tuple[str, str]:
    """annotations/instances_<split>.json (or <split>2017) and the image folder <split>/
    (or <split>2017/, images/<split>/)."""
    names = [f"instances_{split}.json", f"instances_{split}2017.json"]
    jsons = [os.path.join(root, "annotations", n) for n in names]
    ann = next((p for p in jsons if os.path.exists(p)), None)
    if ann is None:
        raise AutobuildError(f"coco:{root} needs annotations/instances_{split}.json (or "
                             f"instances_{split}2017.json) and the images in {split}/")
    folders = [os.path.join(root, d) for d in (split, f"{split}2017",
                                               os.path.join("images", split))]
    images = next((d for d in folders if os.path.isdir(d)), None)
    if images is None:
        raise AutobuildError(f"coco:{root}: no image folder for {split} (looked for "
                             f"{', '.join(repr(d) for d in folders)})")
    return ann, images


def read_coco(root: str, split: str) -> tuple[list[Record], list[str]]:
    """Every image of the split's json (with or without objects) and the category names,
    in category-id order (label k + 1 = the k-th category)."""
    ann_file, image_dir = _coco_files(root, split)
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AutobuildError(f"{ann_file}: bad JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AutobuildError(f"{ann_file}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise AutobuildError(f"{ann_file}: not a COCO instances file (needs lists 'images', "
                             "'annotations' and 'categories')")
    try:
        cats = sorted((_id(c["id"]), str(c["name"])) for c in data["categories"])
        entries = [(_id(im["id"]), str(im["file_name"]), im.get("width"), im.get("height"))
                   for im in data["images"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AutobuildError(f"{ann_file}: malformed category or image entry "
                             f"({_reason(exc)})") from exc
    if not cats:
        raise AutobuildError(f"{ann_file}: 'categories' is empty: a detector needs its classes")
    # A repeated image id would move its objects onto another image.
    for what, key, ids in (("category", "categories", [c for c, _ in cats]),
                           ("image", "images", [e[0] for e in entries])):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise AutobuildError(f"{ann_file}: {what} id {repeated[0]} is listed more than "
                                 f"once in '{key}'")
    images = {ident: name for ident, name, _, _ in entries}
    sizes = {ident: (w, h) for ident, _, w, h in entries}
    label = {cid: i + 1 for i, (cid, _) in enumerate(cats)}
    per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in images}
    for a in data["annotations"]:
        image_id, box, cat, crowd = _coco_annotation(a, ann_file, sizes, label)
        if box is not None:
            per_image[image_id].append((box, cat, crowd))
    records = []
    for image_id, file_name in images.items():
        path = os.path.join(image_dir, file_name)
        if not os.path.exists(path):
            raise AutobuildError(f"{ann_file}: image {image_id}'s file {path!r} does not exist")
        objs = per_image[image_id]
        width, height = sizes[image_id]
        records.append(Record(path, np.asarray([o[0] for o in objs], np.float32).reshape(-1, 4),
                              np.asarray([o[1] for o in objs], np.int64),
                              np.asarray([o[2] for o in objs], bool),
                              _declared(width, height), f"{ann_file} (image {image_id})"))
    return records, [name for _, name in cats]


def _id(value: Any) -> int:
    """A COCO id: an integer, also when written 100.0 or "100"; 100.5 is refused (it was
    truncated to image 100's id)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    raise ValueError(f"an id must be an integer, got {value!r:.40}")


def _reason(exc: Exception) -> str:
    return f"no {exc}" if isinstance(exc, KeyError) else str(exc)


def _coco_annotation(a: Any, path: str, sizes: dict[int, tuple[Any, Any]],
                     label: dict[int, int]) -> tuple[int, list[float] | None, int, bool]:
    """(image id, x1y1x2y2 box or None for a zero-size box, label, crowd) of one
    annotation."""
    try:
        ident, image_id, cat = a.get("id"), _id(a["image_id"]), _id(a["category_id"])
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in bbox):
            raise ValueError(f"bbox must be 4 finite numbers [x, y, width, height], got "
                             f"{bbox!r:.60}")
        x, y, w, h = (float(v) for v in bbox)
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):  # (True == 1, False == 0)
            raise ValueError(f"iscrowd must be 0 or 1, got {crowd!r:.40}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"annotation {a.get('id')!r}" if isinstance(a, dict) else f"annotation {a!r:.40}"
        raise AutobuildError(f"{path}: malformed {what}: {_reason(exc)}") from exc
    if image_id not in sizes:
        raise AutobuildError(f"{path}: annotation {ident} refers to image {image_id}, which "
                             "is not in 'images'")
    if cat not in label:
        raise AutobuildError(f"{path}: annotation {ident} has unknown category_id {cat}; "
                             f"valid: {', '.join(map(str, label))}")
    if w < 0 or h < 0:
        raise AutobuildError(f"{path}: annotation {ident} has a box with negative width or "
                             f"height (bbox {[x, y, w, h]})")
    # Zero-size boxes exist in COCO itself; torchvision's reference drops them, as we do.
    if not (w > 0 and h > 0):
        return image_id, None, label[cat], bool(crowd)
    box = [x, y, x + w, y + h]
    width, height = sizes[image_id]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
           for v in (width, height)):
        box = _inside(box, float(width), float(height), f"{path}: annotation {ident}")
    return image_id, box, label[cat], bool(crowd)
