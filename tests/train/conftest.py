"""Generated datasets for the training tests: tiny ImageFolder trees, a fake CIFAR-10, VOC
and COCO folders; and a one-thread fixture for tests of tiny models."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def one_thread() -> object:
    """One torch thread for a module's tests. Tiny images gain nothing from a second thread,
    and on a shared 2-core machine two OpenMP threads wait on each other: an SSDlite step on
    48x48 images took ~1 s with 2 threads and 60 ms with 1 while other work ran."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Two classes a small CNN separates in a couple of epochs: dark vs bright images, with noise.
_LEVELS = {"dark": 60, "bright": 190}


def write_imagefolder(root: Path, per_class: dict[str, int], size: int = 8, mode: str = "RGB",
                      seed: int = 0) -> Path:
    """root/{train,val}/{dark,bright}/*.png; per_class gives the image count per split."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, n in per_class.items():
        for cls, level in _LEVELS.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 40, (size, size, channels)), 0, 255)
                pixels = pixels.astype(np.uint8)
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(
                    folder / f"{i:03d}.png")
    return root


@pytest.fixture
def easy_folder(tmp_path: Path) -> str:
    """An easy 2-class RGB 8x8 task: 64 train + 32 val images per class."""
    return str(write_imagefolder(tmp_path / "easy", {"train": 64, "val": 32}))


def write_fake_cifar10(root: Path, per_batch: int = 6) -> Path:
    """cifar-10-batches-py/ in the real pickle format (dicts of numpy arrays, bytes keys
    like the originals are read with latin1), with ``per_batch`` images per file."""
    folder = root / "cifar-10-batches-py"
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
             "test_batch"]
    for name in names:
        batch = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"], "num_vis": 3072, "num_cases_per_batch": 6}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


# ---- detection folders ------------------------------------------------------------------
def _voc_xml(filename: str, size: int, objects: list[tuple[str, tuple[float, ...], int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        f"</bndbox></object>" for name, b, difficult in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size}</width>"
            f"<height>{size}</height><depth>3</depth></size>{objs}</annotation>")


def write_voc(root: Path, splits: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """A VOC2007-layout folder: ``splits`` maps a split name to its image count. Image i
    has a 'dog' (1-based box 3,5 -> 20,22) and, on odd i, a difficult 'cat'."""
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in splits.items():
        ids = []
        for _ in range(n):
            image_id = f"{k:06d}"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg")
            objects = [("dog", (3, 5, 20, 22), 0)]
            if k % 2:
                objects.append(("cat", (10, 10, 30, 28), 1))
            (root / "Annotations" / f"{image_id}.xml").write_text(
                _voc_xml(f"{image_id}.jpg", size, objects))
            ids.append(image_id)
            k += 1
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_coco(root: Path, splits: dict[str, int], size: int = 32) -> Path:
    """annotations/instances_<split>.json + <split>/*.png with categories 3 ('a') and
    7 ('b'); every image has one 'a' and one crowd 'b'; the last image of each split also
    has a zero-width box, which is dropped."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            name = f"{i:04d}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / split / name)
            images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 3,
                         "bbox": [2, 4, 10, 12], "iscrowd": 0, "area": 120})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7,
                         "bbox": [15, 15, 10, 10], "iscrowd": 1, "area": 100})
        anns.append({"id": len(anns) + 1, "image_id": 100 + n - 1, "category_id": 3,
                     "bbox": [5, 5, 0, 4], "iscrowd": 0, "area": 0})
        data = {"images": images, "annotations": anns,
                "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
