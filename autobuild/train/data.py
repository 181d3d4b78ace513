"""Datasets for training: ``cifar10``, ``cifar100``, ``imagefolder:PATH`` and ``synthetic``.

:func:`build_data` turns a data spec into a :class:`Data`: train and val datasets with the
standard augmentation and normalisation of that dataset, plus what the model must be built
for (number of classes, input channels and image size), so that the data decides the
model's ``--num-classes`` / ``--input-size`` rather than the other way round.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from autobuild.errors import AutobuildError

__all__ = ["DATA_SPECS", "Data", "build_data"]

DATA_SPECS = "cifar10, cifar100, imagefolder:PATH or synthetic[:size=CxHxW,classes=N,train=N,val=N]"

_STATS = {  # per-dataset channel mean / std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "gray": ((0.5,), (0.25,)),
}
_CIFAR = {  # name: (folder, train files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}
#: Images at most this large (the longer side) train CIFAR-style at their own size;
#: larger ones train ImageNet-style at 224.
SMALL_IMAGE = 64


@dataclass
class Data:
    """Train/val datasets plus the model shape they need."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    classes: list[str]
    spec: str = ""
    data_dir: str | None = None
    train_subset: int | None = None


def build_data(spec: str, data_dir: str | None = None, *, download: bool = False,
               image_size: int | None = None, train_subset: int | None = None,
               val_only: bool = False, subset_key: str = "--train-subset",
               size_key: str = "--image-size") -> Data:
    """Build the datasets a spec names; every bad spec or missing file is an AutobuildError.

    ``train_subset`` keeps a fixed random subset of that many training images (quick runs,
    search trials); the val split is always whole, so accuracies stay comparable.
    ``val_only`` (evaluation) lets an image folder hold ``val/`` alone. ``subset_key``
    names the setting in errors (a search space's ``budget.train_subset``), ``size_key``
    that of ``image_size``, which only an image folder takes (CIFAR is 32 px; synthetic
    data is as large as its ``size=`` says).
    """
    if not isinstance(spec, str) or not spec:
        raise AutobuildError(f"data must be a spec string ({DATA_SPECS}), got {spec!r}")
    name, _, arg = spec.partition(":")
    if image_size is not None and name != "imagefolder":
        fixed = "synthetic:size=CxHxW sets its size" if name == "synthetic" else "it is 32 px"
        raise AutobuildError(f"{size_key} {image_size}: only imagefolder data is resized; "
                             f"{spec!r} is not ({fixed})")
    if name in _CIFAR and not arg:
        data = _cifar(name, os.path.expanduser(data_dir or "data"), download)
    elif name == "imagefolder" and arg:
        data = _imagefolder(os.path.expanduser(arg), image_size, val_only, size_key)
    elif name == "synthetic":
        data = _synthetic(arg)
    else:
        from autobuild.train.detection_data import DETECTION_SPECS

        raise AutobuildError(f"unknown data spec {spec!r}; valid: {DATA_SPECS} (detection: "
                             f"{DETECTION_SPECS})")
    data.spec, data.data_dir = spec, data_dir
    if train_subset is not None:
        if not 1 <= train_subset <= len(data.train):  # type: ignore[arg-type]
            raise AutobuildError(f"{subset_key} must be in 1..{len(data.train)}, "  # type: ignore[arg-type]
                                 f"got {train_subset}")
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        data.train = Subset(data.train, sorted(keep[:train_subset].tolist()))
        data.train_subset = train_subset
    return data


# ---- transforms ---------------------------------------------------------------------------
def _transforms(size: int, stats: tuple[Any, Any], small: bool) -> tuple[Callable, Callable]:
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(*stats)]
    if small:  # CIFAR recipe: pad-4 random crop (scaled for other sizes) + flip
        train = T.Compose([T.Resize(size), T.CenterCrop(size),  # no-ops at the native size
                           T.RandomCrop(size, padding=max(1, size // 8)),
                           T.RandomHorizontalFlip(), *norm])
        return train, T.Compose([T.Resize(size), T.CenterCrop(size), *norm])
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    # ImageNet evaluation: resize to 256/224 of the crop, then centre crop.
    return train, T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])


# ---- CIFAR (read from the pickle batches; torchvision only downloads) -------------------------
class _NumpyUnpickler(pickle.Unpickler):
    """The CIFAR batches hold dicts of numpy arrays: allow exactly that, nothing else."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray",
                "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("_codecs", "encode")}  # how protocol 2 stores bytes under Python 3

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


class _ArrayDataset(Dataset):
    """uint8 HWC images in memory + integer labels, with a PIL transform."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _read_batches(folder: str, files: list[str], key: str) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = _NumpyUnpickler(f, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += [int(v) for v in batch[key]]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError,
                TypeError) as exc:
            raise AutobuildError(f"corrupt CIFAR file {path!r}: {exc}") from exc
    return np.concatenate(images).transpose(0, 2, 3, 1).copy(), labels


def _cifar(name: str, root: str, download: bool) -> Data:
    folder, train_files, test_file, key, n = _CIFAR[name]
    path = os.path.join(root, folder)
    expected = [*train_files, test_file]
    missing = [f for f in expected if not os.path.exists(os.path.join(path, f))]
    if missing and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        made = _missing_dirs(root)
        try:
            cls(root, train=True, download=True)
        except Exception as exc:  # no network, full disk...
            for directory in made:  # innermost first; only what the download left empty
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            raise AutobuildError(f"cannot download {name} into {root!r}: {exc}") from exc
        missing = [f for f in expected if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise AutobuildError(
            f"{name} not found: expected {', '.join(expected)} in {path!r} (missing "
            f"{', '.join(missing)}); pass --data-dir DIR holding {folder}/, or --download")
    train_x, train_y = _read_batches(path, train_files, key)
    val_x, val_y = _read_batches(path, [test_file], key)
    classes = _cifar_classes(path, name, n)
    train_t, val_t = _transforms(32, _STATS[name], small=True)
    return Data(name, _ArrayDataset(train_x, train_y, train_t),
                _ArrayDataset(val_x, val_y, val_t), n, (3, 32, 32), classes)


def _missing_dirs(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _cifar_classes(path: str, name: str, n: int) -> list[str]:
    meta = os.path.join(path, "batches.meta" if name == "cifar10" else "meta")
    key = "label_names" if name == "cifar10" else "fine_label_names"
    try:
        with open(meta, "rb") as f:
            names = [str(c) for c in _NumpyUnpickler(f, encoding="latin1").load()[key]]
        if len(names) == n:
            return names
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
        pass  # the class names are cosmetic: fall back to numbers
    return [str(i) for i in range(n)]


# ---- ImageFolder ---------------------------------------------------------------------------
#: Images whose headers decide a folder's channels (spread over the folder; reading every
#: header of ImageNet would take minutes).
MODE_SAMPLES = 512
_GRAY = ("L", "I", "I;16", "1", "LA")


def _mode_and_size(samples: list[tuple[str, int]]) -> tuple[str, int]:
    """"L" when every sampled image is grayscale, else "RGB" (a colour folder with a few
    grayscale images, like ImageNet, trains 3-channel models: those are converted); and the
    longest side of the first image. Only headers are read."""
    from PIL import Image, UnidentifiedImageError

    step = max(1, len(samples) // MODE_SAMPLES)
    modes = set()
    longest = 0
    for path, _ in samples[::step]:
        try:
            with Image.open(path) as img:
                modes.add("L" if img.mode in _GRAY else "RGB")
                longest = longest or max(img.size)
        except (OSError, UnidentifiedImageError) as exc:
            raise AutobuildError(f"cannot read image {path!r}: {exc}") from None
    return ("L" if modes == {"L"} else "RGB"), longest


#: The smallest image side a folder's images may have without --image-size (its bound).
MIN_IMAGE_SIZE = 8


def _imagefolder(root: str, image_size: int | None, val_only: bool = False,
                 size_key: str = "--image-size") -> Data:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    splits = ("val",) if val_only else ("train", "val")
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise AutobuildError(f"imagefolder:{root} needs {split}/ with one subfolder per "
                                 f"class (the ImageNet layout); {os.path.join(root, split)!r} "
                                 "does not exist")
    try:  # the first split sets the classes, the channels and the native image size
        probe = ImageFolder(os.path.join(root, splits[0]))
    except (FileNotFoundError, RuntimeError) as exc:
        raise AutobuildError(f"imagefolder:{root}: {exc}") from exc
    if len(probe.classes) < 2:
        raise AutobuildError(f"imagefolder:{root}: {splits[0]}/ has {len(probe.classes)} class "
                             f"folder{'s' if len(probe.classes) != 1 else ''} "
                             f"({', '.join(probe.classes) or 'none'}); a classifier needs at "
                             "least 2")
    mode, longest = _mode_and_size(probe.samples)
    channels = 1 if mode == "L" else 3
    small = longest <= SMALL_IMAGE
    if image_size is None and longest < MIN_IMAGE_SIZE:  # (--image-size has this bound too)
        raise AutobuildError(f"imagefolder:{root}: its images are {longest} px a side, under "
                             f"the {MIN_IMAGE_SIZE} px a network is trained on; give an "
                             f"image size of {MIN_IMAGE_SIZE}..4096 to resize them "
                             f"({size_key})")
    size = image_size or (longest if small else 224)
    stats = _STATS["gray"] if channels == 1 else _STATS["imagenet"]
    train_t, val_t = _transforms(size, stats, small)

    def loader(path: str) -> Any:
        try:
            with Image.open(path) as img:
                return img.convert(mode)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or not an image
            raise AutobuildError(f"cannot read image {path!r}: {exc}") from None

    try:
        val = ImageFolder(os.path.join(root, "val"), transform=val_t, loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise AutobuildError(f"imagefolder:{root}: {exc}") from exc
    if val_only:
        train_dir = os.path.join(root, "train")
        if os.path.isdir(train_dir):  # the classes a model trained on train/ knows
            names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            if names != val.classes:
                raise AutobuildError(_class_mismatch(root, names, val.classes))
        return Data("imagefolder", Subset(val, []), val, len(val.classes),
                    (channels, size, size), list(val.classes))
    _mode_and_size(val.samples)  # (its headers too: an unreadable one is refused now)
    train = ImageFolder(os.path.join(root, "train"), transform=train_t, loader=loader)
    if val.classes != train.classes:
        raise AutobuildError(_class_mismatch(root, train.classes, val.classes))
    return Data("imagefolder", train, val, len(train.classes), (channels, size, size),
                list(train.classes))


# ---- synthetic -----------------------------------------------------------------------------
class _Synthetic(Dataset):
    """Random images with a faint per-class pattern: learnable, and free to generate."""

    def __init__(self, n: int, size: tuple[int, int, int], classes: int, seed: int) -> None:
        self.n, self.size, self.classes, self.seed = n, size, classes, seed
        g = torch.Generator().manual_seed(1234)  # patterns shared by train and val
        self.patterns = torch.randn(classes, *size, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)  # same image every epoch
        label = int(torch.randint(self.classes, (1,), generator=g))
        return self.patterns[label] * 0.5 + torch.randn(*self.size, generator=g), label


def _class_mismatch(root: str, train: list[str], val: list[str]) -> str:
    """Which class folder train/ and val/ do not share (labels are the folders' order)."""
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    where = "; ".join(f"{', '.join(map(repr, names))} only in {split}/"
                      for names, split in ((only_train, "train"), (only_val, "val")) if names)
    return (f"imagefolder:{root}: train/ and val/ must have the same class folders: "
            f"{where}")


def _synthetic(arg: str) -> Data:
    opts = {"size": "3x32x32", "classes": "10", "train": "1024", "val": "256"}
    given: set[str] = set()
    for pair in filter(None, arg.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in opts:
            raise AutobuildError(f"bad synthetic option {pair!r}; valid: {DATA_SPECS}")
        if key in given:  # (not decided by whichever comes last)
            raise AutobuildError(f"synthetic option {key} is given twice in {arg!r}")
        opts[key] = value
        given.add(key)
    try:
        size = tuple(int(v) for v in opts["size"].split("x"))
        classes, n_train, n_val = int(opts["classes"]), int(opts["train"]), int(opts["val"])
    except ValueError:
        raise AutobuildError(f"bad synthetic options {arg!r}; valid: {DATA_SPECS}") from None
    if len(size) != 3 or min(size) < 1 or classes < 2 or min(n_train, n_val) < 1:
        raise AutobuildError(f"bad synthetic options {arg!r}: size is CxHxW (each >= 1), "
                             f"classes >= 2, train and val >= 1; valid: {DATA_SPECS}")
    # Bounds that keep a typo from allocating or generating for ever (the class patterns
    # are held in memory; images are made one at a time).
    if size[0] > 64 or max(size[1:]) > 4096 or max(n_train, n_val) > 1_000_000 or \
            classes * size[0] * size[1] * size[2] > 2 ** 28:
        raise AutobuildError(f"bad synthetic options {arg!r}: at most 64 channels, 4096 "
                             "pixels a side, 1,000,000 train or val images, and classes x "
                             "C x H x W <= 2^28 (the class patterns held in memory)")
    shape: tuple[int, int, int] = size  # type: ignore[assignment]
    return Data("synthetic", _Synthetic(n_train, shape, classes, 0),
                _Synthetic(n_val, shape, classes, 1), classes, shape,
                [str(i) for i in range(classes)])
