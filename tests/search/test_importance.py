"""RI importance on a constructed model whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import autobuild
from autobuild.errors import AutobuildError
from autobuild.train.data import Data


def _product_data(n: int = 400) -> Data:
    """Two channels of one pixel; the class is whether their product is positive."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 1, 1, generator=g)
    y = (x[:, 0, 0, 0] * x[:, 1, 0, 0] > 0).long()
    ds = TensorDataset(x, y)
    return Data("product", ds, ds, 2, (2, 1, 1), ["neg", "pos"])


def _constructed_model() -> nn.Module:
    """Site ``0`` computes x0·x1 in its product term; site ``1`` turns it into logits with
    its linear term only (its product term is zero)."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False),
                        nn.Flatten())
    m = autobuild.convert(net, "quadratic", sites=["0", "1"], options={"type": "ours"},
                          input_size=(2, 1, 1), init="preserve")
    with torch.no_grad():
        first, second = m[0], m[1]
        first.weight.zero_()
        first._set_branch(0, torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1))  # a
        first._set_branch(1, torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(2, 2, 1, 1))  # b
        first.bn.weight.fill_(1.0)  # product term on: a·b = x0·x1 in channel 0
        second.weight.zero_()
        second._set_branch(2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1))
    return m.eval()


def test_the_site_that_carries_the_signal_is_the_important_one() -> None:
    model, data = _constructed_model(), _product_data()
    frame = autobuild.search.importance(model, data, device="cpu", progress=False)
    rows = {r.site: r for r in frame.itertuples()}
    assert rows["0"].top1 > 95  # the model solves the task
    assert rows["0"].delta_top1 > 30  # masking the product loses it
    assert rows["1"].delta_top1 == 0  # site 1's product term is zero: masking is a no-op
    assert rows["0"].ri < rows["1"].ri  # so site 1 is the one to revert first
    assert list(frame["site"]) == ["1", "0"]
    assert frame.attrs["epsilon"] == 1 / 400
    # Masking left nothing behind: the model computes what it computed before.
    x = data.val.tensors[0][:8]
    assert torch.equal(model(x), _constructed_model()(x))


def test_importance_command(tmp_path, capsys) -> None:
    import json

    from autobuild.cli import main

    run = str(tmp_path / "run")
    data = "synthetic:size=3x8x8,classes=4,train=64,val=32"
    assert main(["train", "cifar_resnet20", "--to", "quadratic", "--sites", "layer3.*",
                 "--data", data, "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                 "--out", run, "--no-progress"]) == 0
    capsys.readouterr()
    csv = str(tmp_path / "ri.csv")
    assert main(["importance", run, "--json", "--csv", csv]) == 0  # data: the run's own
    result = json.loads(capsys.readouterr().out)
    assert len(result["sites"]) == 6 and result["val_images"] == 32
    assert [s["ri"] for s in result["sites"]] == sorted((s["ri"] for s in result["sites"]),
                                                         reverse=True)
    assert open(csv).readline().startswith("site,family,choice")
    # written again over its own CSV, beside a plan of one's own (neither makes the folder
    # an autobuild output: only marker files together do)
    (tmp_path / "plan.yaml").write_text("conversions: []\n")
    assert main(["importance", run, "--csv", csv, "--force"]) == 0
    assert main(["importance", run]) == 0
    assert "RI = P_M" in capsys.readouterr().out


def test_a_detector_is_refused_in_one_line(tmp_path, capsys) -> None:
    """RI is a classifier's (val top-1): a converted detector is refused, not a traceback."""
    from autobuild.cli import main
    from autobuild.train import build_detection_data

    out = str(tmp_path / "det")
    assert main(["convert", "ssdlite320_mobilenet_v3_large", "--to", "quadratic", "--sites",
                 "backbone.features.0.1.*", "--num-classes", "4", "--input-size", "3,64,64",
                 "--out", out]) == 0
    capsys.readouterr()
    assert main(["importance", out, "--data", "synthetic-detection"]) == 2
    assert "is a detector (ssdlite320_mobilenet_v3_large)" in capsys.readouterr().err
    data = build_detection_data("synthetic-detection:size=64,classes=3,train=4,val=2")
    with pytest.raises(AutobuildError, match="is detection data"):
        autobuild.search.importance(autobuild.load(out), data, device="cpu", progress=False)
