"""Detection data: the VOC and COCO readers on generated folders, synthetic-detection, the
SSD augmentation, and one-line errors naming the malformed file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.train import VOC_CLASSES, build_detection_data
from autobuild.train.detection_data import collate_detection, ssd_transform
from tests.train.conftest import write_coco, write_voc


def test_voc_reader(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "VOCdevkit" / "VOC2007", {"train": 3, "val": 2, "trainval": 5})
    data = build_detection_data(f"voc:{root}", augment="none")
    assert data.classes == list(VOC_CLASSES) and data.num_classes == 21
    assert len(data.train) == 3 and len(data.val) == 2
    image, target = data.val[1]  # image 000004: a dog only
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and image.max() <= 1
    # VOC boxes are 1-based and inclusive: pixels 3..20 span [2, 20] in x.
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 4.0, 20.0, 22.0]]))
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    # A difficult object is evaluated as "ignore" (iscrowd) and left out of training.
    _, odd = data.val[0]  # 000003, odd: dog + difficult cat
    assert odd["labels"].tolist() == [12, 8] and odd["iscrowd"].tolist() == [0, 1]
    _, train_odd = data.train[1]
    assert train_odd["labels"].tolist() == [12]
    # The VOCdevkit parent folder works too, and other splits are chosen by name.
    other = build_detection_data(f"voc:{tmp_path / 'VOCdevkit'},train=trainval", augment="none")
    assert len(other.train) == 5
    # A VOC-format set of other classes lists them in classes.txt.
    (root / "classes.txt").write_text("dog\ncat\n")
    custom = build_detection_data(f"voc:{root}", augment="none")
    assert custom.classes == ["dog", "cat"] and custom.val[0][1]["labels"].tolist() == [1, 2]
    (root / "classes.txt").write_text("dog\n")
    with pytest.raises(AutobuildError, match="unknown class 'cat'; valid: dog"):
        build_detection_data(f"voc:{root}")


def test_coco_reader(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", {"train": 3, "val": 2})
    data = build_detection_data(f"coco:{root}", augment="none")
    assert data.classes == ["a", "b"]  # in category-id order: 3 -> label 1, 7 -> label 2
    image, target = data.val[1]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 4.0, 12.0, 16.0],
                                                              [15.0, 15.0, 25.0, 25.0]]))
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [0, 1]
    _, train_target = data.train[2]  # the zero-width box is dropped, the crowd left out
    assert train_target["labels"].tolist() == [1]


def test_synthetic_detection_and_ssd_augmentation() -> None:
    data = build_detection_data("synthetic-detection:size=48,classes=4,train=6,val=3")
    assert data.classes == ["rectangle", "ellipse", "triangle", "cross"]
    assert data.augment == "ssd"
    a, b = data.val[0], data.val[0]
    torch.testing.assert_close(a[0], b[0])  # the same image every time
    transform = ssd_transform("ssd")
    torch.manual_seed(0)
    for i in range(6):  # boxes stay inside the (cropped / zoomed) image, labels aligned
        image, target = data.train[i]
        h, w = image.shape[-2:]
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) >= 0
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert transform is not None
    images, targets = collate_detection([data.val[0], data.val[1]])
    assert len(images) == len(targets) == 2


@pytest.mark.parametrize("spec, message", [
    ("voc", "unknown detection data spec 'voc'"),
    ("synthetic-detection:size=8", "size in 16..4096"),
    ("synthetic-detection:colour=red", "bad synthetic-detection option"),
    ("voc:/nonexistent", "needs the VOC2007 layout"),
    ("coco:/nonexistent", "needs annotations/instances_train.json"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(AutobuildError, match=message):
        build_detection_data(spec)


def _edit_voc_xml(root: Path, old: str, new: str) -> str:
    path = root / "Annotations" / "000001.xml"
    path.write_text(path.read_text().replace(old, new, 1))
    return str(path)


def _remove_voc_image(root: Path) -> str:
    os.remove(root / "JPEGImages" / "000001.jpg")
    return str(root / "Annotations" / "000001.xml")


def _voc_box_outside(root: Path) -> str:
    _edit_voc_xml(root, "<xmin>3</xmin>", "<xmin>40</xmin>")  # (1-based: x1 = 39)
    return _edit_voc_xml(root, "<xmax>20</xmax>", "<xmax>50</xmax>")


def _voc_xml_directory(root: Path) -> str:
    path = root / "Annotations" / "000001.xml"
    path.unlink()
    path.mkdir()
    return str(path)


def _voc_image_resized(root: Path) -> str:
    from PIL import Image

    Image.new("RGB", (48, 32)).save(root / "JPEGImages" / "000001.jpg")
    return str(root / "Annotations" / "000001.xml")


def _edit_coco(root: Path, edit: Callable[[dict], None]) -> str:
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return str(path)


def _bad_json(root: Path) -> str:
    path = root / "annotations" / "instances_train.json"
    path.write_text(path.read_text()[:-5])
    return str(path)


_VOC_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "bad XML": (lambda r: _edit_voc_xml(r, "</annotation>", "</annotatio>"), "bad XML"),
    "x2 < x1": (lambda r: _edit_voc_xml(r, "<xmax>20</xmax>", "<xmax>1</xmax>"),
                "xmax < xmin"),
    "missing image": (_remove_voc_image, "does not exist"),
    "unknown class": (lambda r: _edit_voc_xml(r, "<name>dog</name>", "<name>dgo</name>"),
                      "unknown class 'dgo'"),
    "not a number": (lambda r: _edit_voc_xml(r, "<ymin>5</ymin>", "<ymin>five</ymin>"),
                     "is not a number"),
    "nan": (lambda r: _edit_voc_xml(r, "<ymin>5</ymin>", "<ymin>nan</ymin>"),
            "<bndbox/ymin> is not a finite number: 'nan'"),
    "a directory": (_voc_xml_directory, "cannot read"),
    "box outside": (_voc_box_outside,
                    "object 1 (dog) has a box outside its 32x32 image (39, 4, 50, 22 as"),
    # drawn for a larger picture: clipping it would train on a box that is not the object
    "box past the edge": (lambda r: _edit_voc_xml(r, "<xmax>20</xmax>", "<xmax>1000</xmax>"),
                          "object 1 (dog) has a box reaching past its 32x32 image (2, 4, 1000, "
                          "22 as x1, y1, x2, y2); an edge may lie at most 2 px outside"),
    # its boxes were drawn on another picture: they would train the detector wrongly
    # one side 0 (0x0 is what some tools write for "unknown", and stays accepted)
    "width 0": (lambda r: _edit_voc_xml(r, "<width>32</width>", "<width>0</width>"),
                "declares a 0x32 image; a size is both sides >= 1 (or 0x0 for unknown)"),
    "image resized": (_voc_image_resized,
                      "declares a 32x32 image but '{root}/JPEGImages/000001.jpg' is 48x32"),
}
_COCO_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "bad JSON": (_bad_json, "bad JSON"),
    "negative width": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        bbox=[5, 5, -3, 4])), "negative width"),
    "unknown category": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        category_id=99)), "unknown category_id 99"),
    "NaN": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        bbox=[5, 5, float("nan"), 4])), "bbox must be 4 finite numbers"),
    "true": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        bbox=[5, 5, True, 4])), "bbox must be 4 finite numbers"),
    "no bbox": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].pop("bbox")),
                "malformed annotation 1: no 'bbox'"),
    "missing image": (lambda r: _edit_coco(r, lambda d: d["images"][0].update(
        file_name="gone.png")), "does not exist"),
    "repeated category": (lambda r: _edit_coco(r, lambda d: d["categories"].append(
        {"id": 3, "name": "c"})), "category id 3 is listed more than once in 'categories'"),
    # it moved image 100's objects onto 0001.png, and dropped 0000.png
    "repeated image": (lambda r: _edit_coco(r, lambda d: d["images"].append(
        {"id": 100, "file_name": "0001.png"})), "image id 100 is listed more than once in "
                                                "'images'"),
    "float image id": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        image_id=100.5)), "an id must be an integer, got 100.5"),
    "text category id": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        category_id="three")), "an id must be an integer, got 'three'"),
    "iscrowd text": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        iscrowd="0")), "iscrowd must be 0 or 1, got '0'"),
    "box outside": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        bbox=[300, 300, 20, 20])), "annotation 1 has a box outside its 32x32 image"),
    "box past the edge": (lambda r: _edit_coco(r, lambda d: d["annotations"][0].update(
        bbox=[2, -9, 10, 12])), "annotation 1 has a box reaching past its 32x32 image"),
    "no categories": (lambda r: _edit_coco(r, lambda d: d.update(categories=[])),
                      "'categories' is empty"),
    "other size": (lambda r: _edit_coco(r, lambda d: d["images"][0].update(width=64)),
                   "(image 100): declares a 64x32 image but"),
}


@pytest.mark.parametrize("case", list(_VOC_CASES) + [f"coco {c}" for c in _COCO_CASES])
def test_malformed_annotation_is_one_line_naming_the_file(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if case.startswith("coco "):
        root = write_coco(tmp_path / "coco", {"train": 2, "val": 1})
        culprit, message = _COCO_CASES[case[5:]]
        spec = f"coco:{root}"
    else:
        root = write_voc(tmp_path / "voc", {"train": 2, "val": 1})
        culprit, message = _VOC_CASES[case]
        spec = f"voc:{root}"
    path = culprit(root)
    message = message.format(root=root)
    code = main(["train", "ssdlite320_mobilenet_v3_large", "--data", spec, "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("autobuild: error: ") and err.count("\n") == 1, err
    assert path in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_train_subset_is_fixed() -> None:
    a = build_detection_data("synthetic-detection:train=10,val=2", train_subset=4)
    b = build_detection_data("synthetic-detection:train=10,val=2", train_subset=4)
    assert len(a.train) == 4
    assert [r.image for r in a.train.records] == [r.image for r in b.train.records]
    with pytest.raises(AutobuildError, match="--train-subset must be in 1..10"):
        build_detection_data("synthetic-detection:train=10,val=2", train_subset=11)
    assert np.array_equal(a.val.records[0].boxes, b.val.records[0].boxes)


def test_voc_shapes_script_round_trips(tmp_path: Path) -> None:
    """scripts/make_voc_shapes.py writes what synthetic-detection generates, in VOC form."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "shapes"
    subprocess.run([sys.executable, str(repo / "scripts" / "make_voc_shapes.py"), str(out),
                    "--train", "3", "--val", "2", "--size", "32"], check=True, cwd=repo,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(repo)})
    voc = build_detection_data(f"voc:{out}", augment="none")
    synthetic = build_detection_data("synthetic-detection:size=32,train=3,val=2",
                                     augment="none")
    assert voc.classes == synthetic.classes == ["rectangle", "ellipse", "triangle"]
    for a, b in zip(voc.val.records, synthetic.val.records, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_data_whose_classes_differ_from_the_runs_is_refused(tmp_path: Path) -> None:
    """Reordered or renamed classes would be scored against the wrong labels, silently."""
    from autobuild.train.runs import check_classes, data_for_run

    root = write_voc(tmp_path / "voc", {"train": 2, "val": 2})
    (root / "classes.txt").write_text("dog\ncat\n")
    record = {"spec": f"voc:{root}", "num_classes": 3, "classes": ["dog", "cat"]}
    assert data_for_run(None, record, val_only=True).classes == ["dog", "cat"]
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(AutobuildError, match="label 1 is 'cat' here and 'dog' there"):
        data_for_run(None, record, val_only=True)
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    with pytest.raises(AutobuildError, match="has 3 classes and the run trained on .*which "
                                             "has 2"):
        data_for_run(None, record, val_only=True)
    # A run recorded before the names were kept: its class count (background included)
    data = build_detection_data(f"voc:{root}", augment="none")
    check_classes(data, {"spec": "old", "num_classes": 4})
    with pytest.raises(AutobuildError, match="which has 20"):
        check_classes(data, {"spec": "old", "num_classes": 21})
    # Classes known by number only (a CIFAR folder without batches.meta): no names to compare
    from types import SimpleNamespace

    numbered = SimpleNamespace(spec="cifar10", classes=[str(i) for i in range(3)],
                               num_classes=3)
    check_classes(numbered, {"spec": "cifar10", "num_classes": 3, "classes": ["a", "b", "c"]})
    with pytest.raises(AutobuildError, match="label 0 is 'x' here and 'a' there"):
        check_classes(SimpleNamespace(spec="s", classes=["x", "b", "c"], num_classes=3),
                      {"spec": "cifar10", "num_classes": 3, "classes": ["a", "b", "c"]})


def test_coco_ids_written_as_integral_numbers_or_text_are_read(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", {"train": 2, "val": 1})
    want = build_detection_data(f"coco:{root}", augment="none")

    def edit(d: dict) -> None:
        d["images"][0]["id"] = 100.0
        d["annotations"][0].update(image_id="100", category_id=3.0)
    _edit_coco(root, edit)
    got = build_detection_data(f"coco:{root}", augment="none")
    for i in range(len(want.train)):
        for key in ("boxes", "labels"):
            torch.testing.assert_close(got.train[i][1][key], want.train[i][1][key])


def test_reader_messages_name_what_differs(tmp_path: Path) -> None:
    root = write_coco(tmp_path / "coco", {"train": 2, "val": 1})
    _edit_coco(root, lambda d: d["categories"][0].update(name="box"))  # id 7: 'b' in val
    with pytest.raises(AutobuildError, match="category 2 is 'box' in train and 'b' in val"):
        build_detection_data(f"coco:{root}")
    voc = write_voc(tmp_path / "voc", {"train": 2, "val": 1})
    with pytest.raises(AutobuildError, match=r"choose it with voc:PATH,val=NAME"):
        build_detection_data(f"voc:{voc},val=nope")
    for name in ("000002.xml",):  # the val image: its dog made difficult too
        path = voc / "Annotations" / name
        path.write_text(path.read_text().replace("<difficult>0</difficult>",
                                                 "<difficult>1</difficult>"))
    with pytest.raises(AutobuildError, match="the validation split has no .*object"):
        build_detection_data(f"voc:{voc}")


def test_an_image_of_another_size_than_declared_is_refused_when_loaded(tmp_path: Path
                                                                       ) -> None:
    """Beyond the headers read before training (a spread of them), each image is checked
    as it is loaded."""
    from PIL import Image

    from autobuild.train.detection_data import DetectionDataset
    from autobuild.train.detection_readers import Record

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    boxes = np.array([[1, 1, 9, 9]], np.float32)
    record = Record(str(tmp_path / "a.png"), boxes, np.array([1]), np.array([False]),
                    (40, 30), "a.xml")
    assert DetectionDataset([record], None)[0][0].shape == (3, 30, 40)
    record.size = (30, 40)
    with pytest.raises(AutobuildError, match=r"^a.xml: declares a 30x40 image but .* is 40x30"):
        DetectionDataset([record], None)[0]


def test_an_edge_a_pixel_outside_the_image_is_clipped(tmp_path: Path) -> None:
    """Annotation tools put edges a pixel or so outside the image: those are clipped, not
    refused (the refusal is for boxes reaching further)."""
    from autobuild.train.detection_readers import read_coco, read_voc

    voc = write_voc(tmp_path / "voc", {"train": 2})
    _edit_voc_xml(voc, "<xmax>20</xmax>", "<xmax>33.5</xmax>")
    _edit_voc_xml(voc, "<ymin>5</ymin>", "<ymin>0</ymin>")  # 1-based: y1 = -1
    record = read_voc(str(voc), "train", VOC_CLASSES)[1]
    assert record.boxes[0].tolist() == [2, 0, 32, 22]
    coco = write_coco(tmp_path / "coco", {"train": 1})
    _edit_coco(coco, lambda d: d["annotations"][0].update(bbox=[-1.5, 4, 34, 12]))
    records, _ = read_coco(str(coco), "train")
    assert records[0].boxes[0].tolist() == [0, 4, 32, 16]
