"""Generated datasets for the training tests: tiny ImageFolder trees and a fake CIFAR-10."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
