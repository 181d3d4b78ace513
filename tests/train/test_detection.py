"""Detection end to end on CPU and generated data: SSDlite baseline and quadratic train,
record mAP per epoch, evaluate what they recorded, resume exactly, log to TensorBoard and
are analysed; backbone weights load (and --init preserve keeps them); wrong pairings of
model and data are one-line errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import autobuild
from autobuild.cli import main
from autobuild.errors import AutobuildError
from autobuild.models import build_model
from autobuild.train import build_detection_data, detection_config, train_detection
from tests.conftest import max_rel_diff
from tests.train.conftest import write_coco, write_voc

MODEL = "ssdlite320_mobilenet_v3_large"
SPEC = "synthetic-detection:size=48,train=4,val=2"
FAST = ["--batch-size", "2", "--device", "cpu", "--no-progress", "--workers", "0",
        "--image-size", "48"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: object) -> None:
    """(see tests/train/conftest.py)"""


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 1-epoch baseline and a 2-epoch quadratic SSDlite (with TensorBoard), at 48x48."""
    root = tmp_path_factory.mktemp("detection")
    base, quad, tb = root / "base", root / "quad", root / "tb"
    assert main(["train", MODEL, "--data", SPEC, "--epochs", "1", "--out", str(base),
                 *FAST]) == 0
    assert main(["train", MODEL, "--to", "quadratic", "--data", SPEC, "--epochs", "2",
                 "--out", str(quad), "--tensorboard", str(tb), "--tensorboard-every", "1",
                 *FAST]) == 0
    return base, quad, tb


def test_train_records_map_and_evaluate_reproduces_it(runs: tuple[Path, Path, Path],
                                                      capsys: pytest.CaptureFixture) -> None:
    base, quad, _ = runs
    assert {"plan.yaml", "weights.safetensors", "last.safetensors", "checkpoint.pt",
            "metrics.csv", "train.yaml"} <= set(os.listdir(quad))
    rows = _rows(quad)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_bbox_loss", "train_cls_loss", "map", "map_50", "map_75",
            "lr", "images_per_s"} <= set(rows[0])
    assert all(0.0 <= float(r["map"]) <= float(r["map_50"]) <= 1.0 for r in rows)
    assert "quadratic" in (quad / "plan.yaml").read_text()
    assert len(_rows(base)) == 1
    capsys.readouterr()
    assert main(["evaluate", str(quad), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = max(rows, key=lambda r: float(r["map"]))  # weights.safetensors = the best epoch
    assert result["map"] == pytest.approx(float(best["map"]), abs=1e-5)
    assert result["map_50"] == pytest.approx(float(best["map_50"]), abs=1e-5)
    assert result["images"] == 2
    assert set(result["per_class"]) <= {"rectangle", "ellipse", "triangle"}
    # no object of 96x96 px in 48 px images: no large-object AP (torchmetrics' -1 was shown)
    assert result["map_large"] is None
    assert main(["evaluate", str(base), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mAP@0.5" in out and "AP@0.5" in out


def test_a_detector_is_not_evaluated_on_data_of_other_classes(
        runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    base, _, _ = runs
    assert main(["evaluate", str(base), "--data", "synthetic-detection:classes=1,size=48",
                 "--device", "cpu"]) == 2
    # (it said "rebuild it with --num-classes", which evaluate cannot do)
    assert "synthetic-detection:classes=1,size=48 has 1 class and the run trained on " \
           "synthetic-detection:size=48,train=4,val=2, which has 3" in capsys.readouterr().err


def test_resume_matches_an_uninterrupted_run(runs: tuple[Path, Path, Path],
                                             tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, it ends where the 2-epoch run ended (which also
    logged to TensorBoard: logging must not change the run)."""
    _, quad, _ = runs
    data = build_detection_data(SPEC, augment="ssdlite")
    model = autobuild.convert(MODEL, to="quadratic", num_classes=data.num_classes,
                              input_size=(3, 48, 48), seed=0)  # as the CLI's --seed 0
    cfg = detection_config(MODEL, epochs=2, batch_size=2, device="cpu", workers=0)
    part = tmp_path / "part"
    stopped = train_detection(model, data, cfg, out_dir=str(part),
                              callback=lambda m: m.epoch < 1)
    assert stopped.stopped_early and len(stopped.history) == 1
    assert main(["train", "--resume", str(part), "--device", "cpu", "--no-progress"]) == 0
    a, b = load_file(quad / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["map"] for r in _rows(quad)] == [r["map"] for r in _rows(part)]


def test_tensorboard_event_files(runs: tuple[Path, Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, tb = runs
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
    acc = EventAccumulator(str(tb), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/map", "val/map_50", "run/lr"} <= scalars
    assert [e.step for e in acc.Scalars("val/map")] == [1, 2]
    histograms = acc.Tags()["histograms"]
    assert any(t.startswith("activation/backbone.") for t in histograms)
    quadratic_terms = {t.rsplit("/", 1)[1] for t in histograms
                       if t.startswith("weight/backbone.features")}
    assert {"a", "b", "c"} <= quadratic_terms  # a quadratic layer's terms, apart
    assert any(t.startswith("grad_norm/") for t in scalars)


def test_analyze_detection_against_the_baseline(runs: tuple[Path, Path, Path],
                                                tmp_path: Path) -> None:
    base, quad, _ = runs
    out = tmp_path / "analysis"
    assert main(["analyze", str(quad), "--compare", str(base), "--out", str(out),
                 "--batches", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    with open(out / "sites.csv") as f:
        sites = list(csv.DictReader(f))
    assert sites and {s["family"] for s in sites} == {"quadratic"}
    assert all(s["layer"].startswith("backbone.") for s in sites)
    # (At 48x48 the last extra block sees 1x1 maps whose anchors may get no gradient.)
    grads = [float(s["grad_norm_mean"]) for s in sites]
    assert all(g >= 0 for g in grads) and sum(g > 0 for g in grads) > len(grads) // 2
    with open(out / "compare.csv") as f:
        compared = list(csv.DictReader(f))
    assert any(r["type_a"] == "QuadraticConv2d" and r["type_b"] == "Conv2d" for r in compared)
    for name in ("activations.png", "compare.png", "compare/activations.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_model_and_data_must_match(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["train", "cifar_resnet20", "--data", SPEC], "is detection data and cifar_resnet20 "
                                                      "is a classifier"),
        (["train", MODEL, "--data", "synthetic"], f"{MODEL} is a detector"),
        (["train", MODEL, "--data", SPEC, "--num-classes", "3"], "has 3 classes (+1 background"),
        (["train", "cifar_resnet20", "--data", "synthetic", "--augment", "ssd"],
         "--augment chooses a detection augmentation"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_backbone_weights_file_and_init_preserve(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(1)
    source = build_model(MODEL, num_classes=4).eval()
    backbone_file = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), backbone_file)
    converted = autobuild.convert(MODEL, to="quadratic", num_classes=4, input_size=(3, 48, 48),
                                  init="preserve", weights=str(backbone_file)).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        want, got = source.backbone(x), converted.backbone(x)
    for k in want:  # the quadratic backbone computes the pretrained backbone's features
        assert max_rel_diff(want[k], got[k]) < 1e-4, k
    detector_file = tmp_path / "detector.pth"
    torch.save(source.state_dict(), detector_file)
    whole = build_model(MODEL, num_classes=4, weights=str(detector_file))
    torch.testing.assert_close(whole.head.state_dict(), source.head.state_dict())
    # Another number of classes: all but the class head (fine-tuning, e.g. COCO's 91)
    torch.manual_seed(2)
    other = build_model(MODEL, num_classes=5, weights=str(detector_file))
    assert "is for another number of classes" in capsys.readouterr().err
    torch.testing.assert_close(other.backbone.state_dict(), source.backbone.state_dict())
    torch.testing.assert_close(other.head.regression_head.state_dict(),
                               source.head.regression_head.state_dict())
    torch.manual_seed(2)
    fresh = build_model(MODEL, num_classes=5).head.classification_head.state_dict()
    trained = source.head.classification_head.state_dict()
    sized = [k for k, v in fresh.items() if v.shape != trained[k].shape]
    assert len(sized) == 12  # each of the 6 feature maps' last conv: weight and bias
    for k, v in other.head.classification_head.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in sized else trained[k])
    mangled = {k: v for k, v in source.state_dict().items() if "regression_head" not in k}
    torch.save(mangled, detector_file)  # a mismatch outside the class head is still an error
    with pytest.raises(AutobuildError, match="cannot load weights .* into ssdlite320"):
        build_model(MODEL, num_classes=5, weights=str(detector_file))
    with pytest.raises(AutobuildError, match="reduced tail"):
        build_model(MODEL, num_classes=4, weights="IMAGENET1K_V1")


def test_ssd300_takes_torchvision_vgg16_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights IMAGENET1K_FEATURES fills SSD300's backbone as torchvision's builder does
    (the download is replaced by a seeded VGG-16: there is no network here)."""
    import torchvision
    from torchvision.models import _api

    with torch.device("meta"):  # shapes only: initialising VGG-16's 138M weights is slow
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(2)
    vgg = {k: torch.randn(shape, generator=g) if k.startswith("features.")
           else torch.zeros(shape) for k, shape in shapes.items()}
    monkeypatch.setattr(_api, "load_state_dict_from_url", lambda *a, **k: vgg)
    model = build_model("ssd300_vgg16", num_classes=3, weights="IMAGENET1K_FEATURES")
    torch.testing.assert_close(model.backbone.features[0].weight, vgg["features.0.weight"])
    torch.testing.assert_close(model.backbone.features[21].weight, vgg["features.21.weight"])
    torch.testing.assert_close(model.backbone.extra[0][1].weight, vgg["features.24.weight"])
    from autobuild.train.detection import check_image_size

    with pytest.raises(AutobuildError, match="cannot run at 128x128"):
        check_image_size("ssd300_vgg16", 128)


def test_other_families_train_on_the_backbone() -> None:
    """Every family with sites in SSDlite's backbone trains the detector (pde-global has
    no stage there: a one-line error)."""
    data = build_detection_data("synthetic-detection:size=32,train=2,val=1", augment="none")
    cfg = detection_config(MODEL, epochs=1, batch_size=2, device="cpu", workers=0)
    for family in ("multiplicative", "parameter-free", "dirac"):
        model = autobuild.convert(MODEL, to=family, num_classes=data.num_classes,
                                  input_size=(3, 32, 32))
        result = train_detection(model, data, cfg)
        assert len(result.history) == 1 and result.history[0].train_loss > 0, family
    with pytest.raises(AutobuildError, match="pde-global converts stage sites"):
        autobuild.convert(MODEL, to="pde-global", num_classes=4, input_size=(3, 32, 32))


def test_voc_and_coco_folders_train_and_evaluate(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    voc = write_voc(tmp_path / "voc", {"train": 2, "val": 2})
    coco = write_coco(tmp_path / "coco", {"train": 2, "val": 2})
    for spec, extra, classes in ((f"voc:{voc}", ["--augment", "ssd"], {"dog"}),
                                 (f"coco:{coco}", [], {"a"})):
        run = tmp_path / f"run-{spec[:3]}"
        assert main(["train", MODEL, "--data", spec, "--epochs", "1", "--out", str(run),
                     *FAST[:-1], "32", *extra]) == 0
        assert (run / "train.yaml").read_text().count(spec) == 1
        capsys.readouterr()
        assert main(["evaluate", str(run), "--json", "--device", "cpu"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["data"] == spec and result["images"] == 2
        assert set(result["per_class"]) == classes  # classes with ground truth
    # Evaluation needs the val split alone (VOC2007's test archive holds no train split).
    (voc / "ImageSets" / "Main" / "train.txt").unlink()
    (voc / "ImageSets" / "Main" / "val.txt").rename(voc / "ImageSets" / "Main" / "test.txt")
    (coco / "annotations" / "instances_train.json").unlink()
    for spec in (f"voc:{voc},val=test", f"coco:{coco}"):
        assert main(["evaluate", str(tmp_path / f"run-{spec[:3]}"), "--data", spec, "--json",
                     "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == 2


def test_a_detection_run_trains_again_on_what_it_recorded(runs: tuple[Path, Path, Path],
                                                          tmp_path: Path) -> None:
    """`train RUN` without --data: the recorded data spec and augmentation (here not the
    detector's default), as evaluate and analyze read them."""
    import yaml

    base, _, _ = runs
    tuned, again = tmp_path / "tuned", tmp_path / "again"
    common = FAST[:-2]  # (a saved detector keeps its size: no --image-size)
    assert main(["train", str(base), "--data", SPEC, "--augment", "ssd", "--epochs", "1",
                 "--out", str(tuned), *common]) == 0
    assert main(["train", str(tuned), "--epochs", "1", "--out", str(again), *common]) == 0
    before = yaml.safe_load((tuned / "train.yaml").read_text())["data"]
    after = yaml.safe_load((again / "train.yaml").read_text())["data"]
    assert after["spec"] == before["spec"] == SPEC
    assert after["augment"] == before["augment"] == "ssd"  # (ssdlite's default: ssdlite)
