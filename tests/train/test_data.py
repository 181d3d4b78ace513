"""Data specs: CIFAR pickles, ImageFolder trees, synthetic data and their error messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autobuild.errors import AutobuildError
from autobuild.train import build_data
from tests.train.conftest import write_fake_cifar10, write_imagefolder


def test_cifar10_reads_the_real_pickle_format(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path, per_batch=6)
    data = build_data("cifar10", str(root))
    assert (len(data.train), len(data.val)) == (30, 6)
    assert data.num_classes == 10 and data.input_size == (3, 32, 32)
    assert data.classes[0] == "airplane"
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10


def test_missing_cifar_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(AutobuildError, match=r"cifar10 not found: expected data_batch_1.*"
                                             r"test_batch.*--data-dir.*--download"):
        build_data("cifar10", str(tmp_path))


def test_corrupt_cifar_file_is_a_one_line_error(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(AutobuildError, match="corrupt CIFAR file .*data_batch_3"):
        build_data("cifar10", str(root))


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    import os
    import pickle

    root = write_fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(AutobuildError, match="forbidden global"):
        build_data("cifar10", str(root))


@pytest.mark.parametrize("spec", ["cifar11", "imagefolder", "imagenet:/x", "synthetic:size=3x8",
                                  "synthetic:colour=red", "cifar10:extra"])
def test_bad_specs_list_the_valid_ones(spec: str) -> None:
    with pytest.raises(AutobuildError, match="cifar10, cifar100, imagefolder:PATH"):
        build_data(spec)


def test_imagefolder_takes_classes_channels_and_size_from_the_data(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "gray", {"train": 3, "val": 2}, size=12, mode="L")
    data = build_data(f"imagefolder:{root}")
    assert data.num_classes == 2 and data.classes == ["bright", "dark"]
    assert data.input_size == (1, 12, 12)
    assert data.train[0][0].shape == (1, 12, 12) and data.val[0][0].shape == (1, 12, 12)
    resized = build_data(f"imagefolder:{root}", image_size=8)
    assert resized.input_size == (1, 8, 8) and resized.train[0][0].shape == (1, 8, 8)


def test_imagefolder_needs_train_and_val(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "d", {"train": 2})
    with pytest.raises(AutobuildError, match=r"needs val/ .*ImageNet layout"):
        build_data(f"imagefolder:{tmp_path / 'd'}")


def test_evaluation_reads_an_imagefolder_with_val_alone(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "v", {"val": 3}, size=12)
    with pytest.raises(AutobuildError, match=r"needs train/"):
        build_data(f"imagefolder:{root}")
    data = build_data(f"imagefolder:{root}", val_only=True)
    assert len(data.train) == 0 and len(data.val) == 6
    assert data.num_classes == 2 and data.input_size == (3, 12, 12)
    # Where train/ is there too, its class folders must be val/'s (labels are their order).
    (root / "train" / "bright").mkdir(parents=True)
    (root / "train" / "dim").mkdir()
    with pytest.raises(AutobuildError, match="must have the same class folders: 'dim' only "
                                             "in train/; 'dark' only in val/$"):
        build_data(f"imagefolder:{root}", val_only=True)


def test_synthetic_options_and_subset() -> None:
    data = build_data("synthetic:size=1x16x16,classes=4,train=40,val=8", train_subset=10)
    assert data.input_size == (1, 16, 16) and data.num_classes == 4
    assert len(data.train) == 10 and len(data.val) == 8
    assert torch.equal(data.val[3][0], data.val[3][0])  # the same image every time
    with pytest.raises(AutobuildError, match="--train-subset must be in 1..40"):
        build_data("synthetic:train=40", train_subset=41)


def test_a_failed_download_leaves_no_directory_behind(tmp_path, monkeypatch) -> None:
    import torchvision

    def offline(root, **kw):
        os.makedirs(root, exist_ok=True)  # torchvision makes the root before it fetches
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "dl" / "x"
    with pytest.raises(AutobuildError, match="cannot download cifar10 into .*Name or service"):
        build_data("cifar10", str(root), download=True)
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("spec,needle", [
    ("synthetic:size=3x8x8,val=16,val=17", "synthetic option val is given twice"),
    ("synthetic-detection:seed=1,seed=2", "synthetic-detection option seed is given twice"),
    ("voc:/nowhere,train=a,train=b", "data option train is given twice"),
])
def test_a_data_option_given_twice_is_refused(spec: str, needle: str) -> None:
    """(it took the last value, where a repeated family option or key is refused)"""
    from autobuild.train.detection_data import build_detection_data, is_detection_spec

    with pytest.raises(AutobuildError, match=needle):
        (build_detection_data if is_detection_spec(spec) else build_data)(spec)
