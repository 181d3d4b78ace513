"""``autobuild analyze`` and ``train --tensorboard``: CSV files and real PNG images, the
quadratic terms apart, a comparison of two runs, and a model left as it was."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import autobuild
from autobuild.cli import main
from autobuild.train.analyze import collect, layers_of, weight_terms
from autobuild.variants.quadratic import QuadraticConv2d

SPEC = "synthetic:size=3x16x16,classes=3,train=32,val=16"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: object) -> None:
    """(see tests/train/conftest.py)"""


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """cifar_resnet20 and its quadratic conversion, saved by `convert` (no training)."""
    root = tmp_path_factory.mktemp("analyze")
    base, quad = root / "base", root / "quad"
    size = ["--num-classes", "3", "--input-size", "3,16,16"]
    assert main(["train", "cifar_resnet20", "--data", SPEC, "--epochs", "1", "--out",
                 str(base), "--batch-size", "16", "--device", "cpu", "--no-progress"]) == 0
    assert main(["convert", "cifar_resnet20", "--to", "quadratic", *size, "--out",
                 str(quad)]) == 0
    return base, quad


def test_analyze_writes_csv_and_png(saved: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    base, quad = saved
    out = tmp_path / "out"
    # A directory `convert` wrote has no recorded data: --data names it.
    assert main(["analyze", str(quad), "--data", SPEC, "--out", str(out), "--compare",
                 str(base), "--batches", "2", "--batch-size", "8", "--device", "cpu"]) == 0
    assert "16 val images, 57 layers, 18 converted sites (18 of the layers)" in \
        capsys.readouterr().out
    layers = _csv(out / "layers.csv")
    assert len(layers) == 57
    assert {r["type"] for r in layers} >= {"Conv2d", "BatchNorm2d", "Linear",
                                           "QuadraticConv2d"}
    for r in layers:
        assert float(r["act_std"]) > 0 and 0 <= float(r["act_zero_frac"]) <= 1, r
    sites = _csv(out / "sites.csv")
    assert len(sites) == 18 and {r["family"] for r in sites} == {"quadratic"}
    assert all(r["site"] == r["layer"] for r in sites)
    assert all(float(r["grad_norm_mean"]) > 0 for r in sites)
    terms = _csv(out / "weights.csv")
    site_terms = {(r["term"], r["role"]) for r in terms if r["layer"] == "layer1.0.conv1"}
    assert site_terms == {("a", "second-order"), ("b", "second-order"), ("c", "first-order")}
    histograms = _csv(out / "histograms.csv")
    assert {r["kind"] for r in histograms} == {"activation", "weight"}
    assert sum(int(r["count"]) for r in histograms
               if r["kind"] == "weight" and r["layer"] == "conv1") == 3 * 16 * 9
    compared = _csv(out / "compare.csv")
    row = next(r for r in compared if r["layer"] == "layer1.0.conv1")
    assert (row["type_a"], row["type_b"]) == ("QuadraticConv2d", "Conv2d")
    assert len(_csv(out / "compare" / "layers.csv")) == 39  # the baseline
    import matplotlib.image

    for name in ("activations.png", "gradients.png", "weights.png", "activation_histograms.png",
                 "weight_histograms.png", "compare.png", "compare/activations.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG, name
        image = matplotlib.image.imread(out / name)  # decodes: a real image
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # An existing analysis is not overwritten without --force ...
    assert main(["analyze", str(quad), "--data", SPEC, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # ... and --force replaces it whole: no plot or comparison of the old one stays.
    assert main(["analyze", str(quad), "--data", SPEC, "--out", str(out), "--no-plots",
                 "--batches", "1", "--batch-size", "8", "--device", "cpu", "--force"]) == 0
    assert sorted(os.listdir(out)) == ["histograms.csv", "layers.csv", "sites.csv",
                                       "weights.csv"]


def test_analyze_uses_the_recorded_data_and_refuses_mismatches(
        saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, _ = saved
    out = tmp_path / "out"
    assert main(["analyze", str(base), "--out", str(out), "--no-plots", "--batches", "1",
                 "--device", "cpu"]) == 0
    assert (out / "layers.csv").exists() and not (out / "activations.png").exists()
    capsys.readouterr()
    assert main(["analyze", str(base), "--out", str(tmp_path / "x"), "--data",
                 "synthetic-detection"]) == 2
    err = capsys.readouterr().err
    assert "is detection data and cifar_resnet20 is a classifier" in err
    assert err.count("\n") == 1
    # --compare a run of other classes: its statistics would be measured on wrong labels
    other = tmp_path / "other"
    shutil.copytree(base, other)
    record = yaml.safe_load((other / "train.yaml").read_text())
    record["data"].update(num_classes=4, classes=["a", "b", "c", "d"])
    (other / "train.yaml").write_text(yaml.safe_dump(record))
    assert main(["analyze", str(base), "--compare", str(other), "--out",
                 str(tmp_path / "y"), "--no-plots", "--batches", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--compare {other}: " in err and "which has 4" in err and err.count("\n") == 1


@pytest.mark.parametrize("qtype, terms", [
    ("ours", [("a", "second-order"), ("b", "second-order"), ("c", "first-order")]),
    ("t4", [("a", "second-order"), ("b", "second-order")]),
    ("fan", [("a", "second-order"), ("b", "second-order"), ("sq", "second-order")]),
    ("t2", [("a", "second-order")]),
    ("volterra", [("weight", "first-order"), ("quad", "second-order")]),
])
def test_weight_terms_split_quadratic_layers(qtype: str, terms: list[tuple[str, str]]) -> None:
    layer = QuadraticConv2d(qtype, 4, 6, 3, padding=1)
    got = weight_terms(layer)
    assert [(t, r) for t, r, _ in got] == terms
    if qtype == "ours":  # c is the first-order branch the baseline's weights go into
        conv = nn.Conv2d(4, 6, 3, padding=1)
        layer.preserve(conv.weight.detach(), conv.bias.detach())
        torch.testing.assert_close(weight_terms(layer)[2][2], conv.weight.detach())
        assert all(t.shape == (6, 4, 3, 3) for _, _, t in got)


def test_collect_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = autobuild.convert("cifar_resnet20", to="quadratic", num_classes=3,
                              input_size=(3, 16, 16))
    model.train()
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    analysis = collect(model, "classification", batches)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():  # BN running statistics included
        assert torch.equal(v, before[k]), k
    assert [s.layer for s in analysis.layers] == [n for n, _, _ in layers_of(model)]
    assert {s.family for s in analysis.family_layers} == {"quadratic"}


def test_layers_are_named_with_the_site_they_are_part_of() -> None:
    """A site may hold several of a family's layers (a QL block and its hardball; Dirac's
    one whole-network site every conv): each row names its site, and the count of sites is
    the plan's (it counted layers: 3 sites reported as 4)."""
    model = autobuild.convert("cifar_resnet20", to="multiplicative",
                              sites=["layer1.0", "layer2.0", "layer3.0"], num_classes=3,
                              input_size=(3, 16, 16))
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
    analysis = collect(model, "classification", batches)
    assert analysis.site_names == ["layer1.0", "layer2.0", "layer3.0"]
    rows = {s.layer: s for s in analysis.layers}
    assert len(analysis.family_layers) > 3 and {s.site for s in analysis.family_layers} == {
        "layer1.0", "layer2.0", "layer3.0"}
    assert rows["layer2.0"].site == "layer2.0" and rows["layer2.0.hardball"].site == "layer2.0"
    assert rows["layer2.0.conv1"].site == "layer2.0" and rows["layer1.1.conv1"].site == ""
    # a block is one unit: its norms cover its convs' weights (they were NaN: no own ones)
    assert rows["layer2.0"].grad_norm_mean > 0 and rows["layer2.0"].weight_norm > 0
    dirac = collect(autobuild.convert("cifar_resnet20", to="dirac", num_classes=3,
                                      input_size=(3, 16, 16)), "classification", batches)
    assert dirac.site_names == ["network"]
    assert {s.site for s in dirac.family_layers} == {"network"} and len(dirac.family_layers) == 18
    assert {s.site for s in dirac.layers if not s.family} == {""}
    # a detector's traced root is its backbone: a whole-network site holds its family's
    # layers only there too
    from autobuild.train.analyze import _site_of

    paths = {"network": "backbone"}
    assert _site_of("backbone.features.1", "", paths, "backbone") == ""
    assert _site_of("backbone.features.1.0", "dirac", paths, "backbone") == "network"


def test_train_tensorboard_writes_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    assert main(["train", "cifar_resnet20", "--to", "quadratic", "--data", SPEC, "--epochs",
                 "2", "--out", str(tmp_path / "run"), "--batch-size", "16", "--device", "cpu",
                 "--no-progress", "--tensorboard", str(tb), "--tensorboard-every", "2"]) == 0
    events = [f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    acc = EventAccumulator(str(tb), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/top1")] == [1, 2]
    assert {"train/loss", "train/acc", "val/loss", "run/lr"} <= set(acc.Tags()["scalars"])
    histograms = acc.Tags()["histograms"]
    assert "activation/layer1.0.conv1" in histograms
    assert {"weight/layer1.0.conv1/a", "weight/layer1.0.conv1/c"} <= set(histograms)
    assert [e.step for e in acc.Histograms("activation/conv1")] == [2]  # every 2nd epoch


def test_an_overflowing_model_is_still_analysed_and_logged(tmp_path: Path) -> None:
    """inf / NaN activations (what the analysis is for) are reported, not a crash."""
    from autobuild.train.tensorboard import TensorBoardLogger

    model = autobuild.convert("cifar_resnet20", to="quadratic", num_classes=3,
                              input_size=(3, 16, 16))
    with torch.no_grad():
        model.layer2[0].conv1.weight.fill_(float("inf"))
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
    analysis = collect(model, "classification", batches)
    broken = next(s for s in analysis.layers if s.layer == "layer3.0.conv1")
    assert not (broken.act_std < float("inf"))  # inf or NaN
    from autobuild.train.analyze_files import write_analysis

    assert (tmp_path / "a").exists() is False
    write_analysis(analysis, str(tmp_path / "a"))
    assert (tmp_path / "a" / "activations.png").read_bytes()[:8] == PNG
    logger = TensorBoardLogger(str(tmp_path / "tb"))
    logger.histograms(model, "classification", batches, 1, torch.device("cpu"))
    logger.close()
    assert os.listdir(tmp_path / "tb")
