"""Site discovery: call sites, residual blocks by structure, stages, shapes and costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import select_sites


def find_sites(module, input_size):
    return autobuild.analyze(module, input_size=input_size).sites()


def _kinds(sites):
    out = {}
    for s in sites:
        out.setdefault(s.kind, []).append(s)
    return out


def test_resnet50_sites() -> None:
    base = resolve_baseline("resnet50")
    kinds = _kinds(find_sites(base.module, base.input_size))
    assert len(kinds["conv"]) == 53 and len(kinds["linear"]) == 1
    assert [s.name for s in kinds["stage"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert len(kinds["block"]) == 16
    b = next(s for s in kinds["block"] if s.name == "layer2.0")
    assert (b.in_channels, b.out_channels, b.stride) == (256, 512, 2)
    assert b.extra["shortcut"] == "projection"
    assert next(s for s in kinds["block"] if s.name == "layer2.1").extra["shortcut"] == "identity"
    conv = next(s for s in kinds["conv"] if s.name == "layer1.0.conv2")
    assert conv.extra == {"stem": False, "bn": "layer1.0.bn2", "act": "layer1.0.relu",
                          "into_add": False}
    last = next(s for s in kinds["conv"] if s.name == "layer1.0.conv3")
    assert last.extra["into_add"] and last.extra["bn"] == "layer1.0.bn3"
    assert conv.output_shape == (64, 56, 56) and conv.macs == 56 * 56 * 64 * 64 * 9
    assert next(s for s in kinds["conv"] if s.name == "conv1").extra["stem"]


def test_cifar_resnet_option_a_blocks_are_found() -> None:
    base = resolve_baseline("cifar_resnet20")
    blocks = [s for s in find_sites(base.module, base.input_size) if s.kind == "block"]
    assert len(blocks) == 9
    first = next(s for s in blocks if s.name == "layer2.0")
    assert (first.in_channels, first.out_channels, first.stride) == (16, 32, 2)


def test_vgg_has_no_blocks() -> None:
    base = resolve_baseline("cifar_vgg16")
    kinds = _kinds(find_sites(base.module, base.input_size))
    assert "block" not in kinds and "stage" not in kinds and len(kinds["conv"]) == 13


class Shared(nn.Module):
    """One conv and one ReLU module, each called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(self.relu(self.conv(x))))


def test_a_module_called_twice_is_two_sites_rewritten_separately() -> None:
    names = [s.name for s in autobuild.sites(Shared(), "quadratic", input_size=(3, 8, 8))]
    assert names == ["conv#0", "conv#1"]
    torch.manual_seed(0)
    base = Shared()
    m = autobuild.convert(base, "quadratic", sites=["conv#1"], input_size=(3, 8, 8),
                          init="preserve")
    assert type(m.conv).__name__ == "Conv2d" and type(m.conv_1).__name__ == "QuadraticConv2d"
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m(x), base(x), atol=1e-6)


class Thrice(nn.Module):
    """One conv called three times, each call followed by a different function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(torch.sigmoid(self.conv(torch.relu(self.conv(x))))))


@pytest.mark.parametrize("chosen", [["conv#0", "conv#1"], ["conv#1", "conv#2"],
                                    ["conv#0", "conv#2"], ["conv#0", "conv#1", "conv#2"]])
def test_each_call_site_converts_its_own_call(chosen: list[str]) -> None:
    m = autobuild.convert(Thrice(), "quadratic", sites=chosen, input_size=(3, 8, 8))
    calls = [n.target for n in m.graph.nodes if n.op == "call_module"]
    # Converting one call renames its node: later calls must keep their index.
    assert calls == [f"conv_{i}" if f"conv#{i}" in chosen else "conv" for i in range(3)]
    assert autobuild.site_modules(m) == {c: f"conv_{c[-1]}" for c in chosen}
    # A module none of whose calls is left is dropped: it was dead weight, counted and saved.
    assert hasattr(m, "conv") == (len(chosen) < 3)
    m(torch.randn(1, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_a_family_refusing_a_shared_call_says_why() -> None:
    with pytest.raises(AutobuildError, match="conv is one conv called several times; its calls "
                                             "share one weight"):
        autobuild.convert(Shared(), placement={"conv#0": "quadratic",
                                               "conv#1": "dirac:scope=convs"},
                          input_size=(3, 8, 8))


def test_select_sites_unknown_pattern_lists_valid_names() -> None:
    base = resolve_baseline("cifar_resnet20")
    sites = autobuild.sites("cifar_resnet20", "quadratic")
    assert len(select_sites(sites, ["layer1.*"], family="quadratic", model="m")) == 6
    with pytest.raises(AutobuildError, match="valid sites: conv1, layer1.0.conv1"):
        select_sites(sites, ["nope.*"], family="quadratic", model=base.name)


def test_site_to_dict_is_json_ready() -> None:
    import json

    site = autobuild.sites("cifar_resnet20", "quadratic")[0]
    assert json.loads(json.dumps(site.to_dict()))["name"] == "conv1"


def test_identity_module_shortcut_odd_sizes_and_one_block_stages() -> None:
    base = resolve_baseline("cifar_resnet20")
    blocks = {s.name: s for s in find_sites(base.module, (3, 28, 28)) if s.kind == "block"}
    assert blocks["layer1.1"].extra["shortcut"] == "identity"  # nn.Identity() is called
    assert blocks["layer2.0"].extra["shortcut"] == "projection"
    assert blocks["layer3.0"].stride == 2  # 14x14 -> 7x7, and 7x7 -> 4x4 below
    blocks = {s.name: s for s in find_sites(base.module, (3, 14, 14)) if s.kind == "block"}
    assert blocks["layer3.0"].stride == 2
    one_block = resolve_baseline(torch.nn.Sequential(torch.nn.Sequential(
        base.module.layer1[1])), input_size=(16, 8, 8))
    kinds = {(s.kind, s.name) for s in find_sites(one_block.module, (16, 8, 8))
             if s.kind in ("block", "stage")}
    assert kinds == {("block", "0.0"), ("stage", "0")}


def test_weights_saved_with_a_dropped_shared_module_still_load(tmp_path) -> None:
    """Builds before the shared module was dropped saved its weights (dead weight): those
    files load; any other extra weight is still refused."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    m = autobuild.convert(Thrice(), "quadratic", sites=["conv#0", "conv#1", "conv#2"],
                          input_size=(3, 8, 8))
    autobuild.save(m, str(tmp_path / "m"))
    path = tmp_path / "m" / "weights.safetensors"
    state = load_file(path)
    save_file({**state, "conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)},
              path)
    loaded = autobuild.load(str(tmp_path / "m"), baseline=Thrice())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), m.eval()(x))
    save_file({**state, "other.weight": torch.zeros(1)}, path)
    with pytest.raises(AutobuildError, match="1 unexpected"):
        autobuild.load(str(tmp_path / "m"), baseline=Thrice())
