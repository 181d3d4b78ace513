"""Baselines: the papers' CIFAR networks, torchvision by name, detectors, timm."""

from __future__ import annotations

import os

import pytest
import torch

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import build_model, list_models, resolve_baseline
from tests.conftest import convert_baseline


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6),
                                          (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_params_match_he_et_al(depth: int, params: float) -> None:
    m = build_model(f"cifar_resnet{depth}")
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(params, rel=0.03)


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_cifar_vgg(depth: int) -> None:
    m = build_model(f"cifar_vgg{depth}", num_classes=100)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert isinstance(m.classifier, torch.nn.Linear)


@pytest.mark.parametrize("depth,params,paper", [(100, 769_162, 0.8e6),
                                                (250, 15_324_406, 15.3e6),
                                                (190, 25_624_430, 25.6e6)])
def test_cifar_densenet_bc_matches_huang_et_al(depth: int, params: int, paper: float) -> None:
    """Exact counts of the reference DenseNet-BC (gpleiss/efficient_densenet_pytorch, as
    PDE-Global ships it; 769,162 measured by instantiating it) and the paper's Table 2."""
    m = build_model(f"cifar_densenet_bc{depth}", num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == params
    assert params == pytest.approx(paper, abs=0.05e6)
    if depth == 100:
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        c = autobuild.count(m, (3, 32, 32))
        assert c.macs == pytest.approx(288e6, rel=1e-3)
        # Other families find their sites in it: every 3x3 conv after the stem.
        pf = autobuild.convert("cifar_densenet_bc100", "parameter-free")
        assert len(autobuild.plan_of(pf).sites) == 48


def test_cifar_darts_v2_matches_the_reference_network() -> None:
    """DARTS-V2 (36 channels, 20 cells, no auxiliary tower): 3,349,342 params as the
    reference DARTS_NetworkCIFAR (PDE-Global's darts.py, auxiliary=False) instantiated here,
    the paper's 3.3M; the reference module names, so its weights load by name."""
    m = build_model("cifar_darts_v2", num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == 3_349_342
    c = autobuild.count(m, (3, 32, 32))
    assert c.macs == pytest.approx(528.36e6, rel=1e-4)
    assert "cells.0._ops.0.op.1.weight" in m.state_dict()  # a sep conv's first depthwise
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    q = autobuild.convert("cifar_darts_v2", "parameter-free")
    assert len(autobuild.plan_of(q).sites) == 198


def test_cifar_darts_v2_aux_is_the_reference_training_network() -> None:
    """With its auxiliary tower: 3,825,768 params, as the reference DARTS_NetworkCIFAR with
    auxiliary=True instantiated here (the tower adds 476,426); at evaluation the tower does
    not run, so the MACs and the output are cifar_darts_v2's. DARTS-Global keeps the tower
    (1,268,364 = 791,938 + 476,426, as the reference), and conversions keep it and the
    cells' drop path."""
    from autobuild.train.regularize import auxiliary_heads, drop_path_modules

    m = build_model("cifar_darts_v2_aux", num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == 3_825_768
    assert "auxiliary_head.features.5.weight" in m.state_dict()  # the reference names
    assert autobuild.count(m, (3, 32, 32)).macs == pytest.approx(528.36e6, rel=1e-4)
    plain = build_model("cifar_darts_v2", num_classes=10)
    plain.load_state_dict({k: v for k, v in m.state_dict().items()
                           if not k.startswith("auxiliary_head.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), plain.eval()(x))
    g = autobuild.convert("cifar_darts_v2_aux", "pde-global", options={"layout": "paper"})
    assert sum(p.numel() for p in g.parameters()) == 1_268_364
    q = autobuild.convert("cifar_darts_v2_aux", "parameter-free")
    assert len(auxiliary_heads(q)) == 1 and len(drop_path_modules(q)) == 20
    auxiliary_heads(q)[0].collect = True  # as a training run sets it
    q.train()(x)
    assert auxiliary_heads(q)[0].auxiliary_logits.shape == (2, 10)


def test_resnet50_reference_counts() -> None:
    c = autobuild.count(build_model("resnet50"), (3, 224, 224))
    assert c.params == pytest.approx(25.56e6, rel=5e-3)
    assert c.macs == pytest.approx(4.1e9, rel=0.01)


def test_every_torchvision_classifier_is_registered() -> None:
    import torchvision

    names = {e.name for e in list_models("torchvision")}
    assert names == set(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("name,size", [("ssd300_vgg16", 300),
                                       ("ssdlite320_mobilenet_v3_large", 320)])
def test_detector_backbone_converts_and_detector_runs(name: str, size: int) -> None:
    m = autobuild.convert(name, "quadratic", options={"type": "t4"})
    sites = autobuild.plan_of(m).sites
    assert sites and all(s.startswith("backbone.") for s in sites)
    first = autobuild.sites(name, "quadratic")[1]
    assert first.extra["act"].startswith("backbone.")  # module names carry the root too
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, size, size)])
    assert out[0]["boxes"].shape[-1] == 4 and "scores" in out[0]


def test_timm_models() -> None:
    pytest.importorskip("timm")
    m = autobuild.convert("timm:resnet18", "quadratic", input_size=(3, 64, 64), num_classes=5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(AutobuildError, match="unknown timm model"):
        autobuild.convert("timm:not_a_model", "quadratic")


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(AutobuildError, match=r"did you mean resnet50.*valid: .*cifar_resnet20"
                       r".*your own is registered first: autobuild.register_model, or --import"):
        build_model("resnet5")
    # the names a word or a digit away come first, whatever the case
    for typed, meant in (("resnet20", "cifar_resnet20"), ("densenet", "densenet121"),
                         ("ResNet50", "resnet50"), ("darts", "cifar_darts_v2")):
        with pytest.raises(AutobuildError, match=rf"\(did you mean {meant}[,?]"):
            build_model(typed)


def test_weights_file(tmp_path) -> None:
    torch.manual_seed(0)
    src = build_model("cifar_resnet20")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = build_model("cifar_resnet20", weights=str(tmp_path / "w.pth"))
    assert torch.equal(m.fc.weight, src.fc.weight)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AutobuildError, match="cannot load weights"):
        build_model("cifar_resnet20", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(AutobuildError, match="does not exist"):
        build_model("cifar_resnet20", weights=str(tmp_path / "missing.pth"))
    # Weights of another class count: the message says which tensor does not fit.
    torch.save(build_model("cifar_resnet20", num_classes=3).state_dict(), tmp_path / "c3.pth")
    with pytest.raises(AutobuildError, match=r"size mismatch for fc.weight: .*\(and 1 more\)"):
        build_model("cifar_resnet20", weights=str(tmp_path / "c3.pth"))


# A spread of torchvision families (every classifier traces: see docs/architecture.md).
@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small",
                                  "efficientnet_b0", "densenet121", "googlenet",
                                  "shufflenet_v2_x0_5", "squeezenet1_0", "convnext_tiny",
                                  "regnet_x_400mf", "mnasnet0_5", "resnext50_32x4d"])
def test_torchvision_classifiers_convert(name: str) -> None:
    torch.manual_seed(0)
    base = resolve_baseline(name)
    converted = convert_baseline(base, "quadratic", options={"type": "fan"}, init="preserve")
    assert converted.changes
    x = torch.randn(1, *base.input_size)
    base.module.eval()
    converted.model.eval()
    with torch.no_grad():
        y0, y1 = base.module(x), converted.model(x)
    assert float((y0 - y1).abs().max() / y0.abs().max()) <= 1e-4


def test_transformers_have_linear_sites_only() -> None:
    with pytest.raises(AutobuildError, match="no default site in swin_t; name sites"):
        autobuild.convert("swin_t", "quadratic")
    m = autobuild.convert("swin_t", "quadratic", sites=["features.1.0.mlp.0"])
    assert type(m.features[1][0].mlp[0]).__name__ == "QuadraticLinear"


def test_a_registered_builder_gets_the_registered_class_count() -> None:
    """``builder(num_classes=...)``, as register_model says: a builder without a default
    of its own (the README's example) used to fail with a TypeError."""
    import torchvision

    from autobuild.models.registry import _REGISTRY

    autobuild.register_model("readme-net", lambda num_classes: torchvision.models.resnet18(
        num_classes=num_classes), input_size=(3, 64, 64), num_classes=10)
    # A builder with a default of its own keeps it when no count is asked (plans saved
    # without one were built so, and must load the same).
    autobuild.register_model("defaulted-net", lambda num_classes=7: torchvision.models.resnet18(
        num_classes=num_classes), input_size=(3, 64, 64))
    try:
        a = autobuild.analyze("readme-net")
        assert a.baseline.module.fc.out_features == 10
        assert autobuild.analyze("readme-net", num_classes=3).baseline.module.fc.out_features == 3
        assert autobuild.analyze("defaulted-net").baseline.module.fc.out_features == 7
    finally:
        del _REGISTRY["readme-net"], _REGISTRY["defaulted-net"]


def test_a_failed_weights_download_leaves_no_cache_directory(tmp_path, monkeypatch) -> None:
    """Offline, torch creates the hub's checkpoints directory before it finds there is no
    network: the refusal removes what it made (and only that)."""
    import torch.hub

    from autobuild.models.registry import fetch_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home" / "torch"))
    (tmp_path / "home").mkdir()
    with pytest.raises(AutobuildError, match=r"cannot fetch X \(no network\?\)"):
        fetch_weights(lambda: torch.hub.load_state_dict_from_url("http://127.0.0.1:9/w.pth"),
                      "X")
    assert os.listdir(tmp_path / "home") == []
    kept = tmp_path / "home" / "torch" / "hub" / "checkpoints"
    kept.mkdir(parents=True)
    (kept / "other.pth").write_bytes(b"x")
    with pytest.raises(AutobuildError):
        fetch_weights(lambda: torch.hub.load_state_dict_from_url("http://127.0.0.1:9/w.pth"),
                      "X")
    assert os.listdir(kept) == ["other.pth"]
