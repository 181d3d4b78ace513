"""The worked example of docs/custom-family.md runs end to end: API, placements mixed with a
built-in family, cost before building, save/load, and the CLI through --import."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import autobuild

ROOT = Path(__file__).resolve().parents[2]


def _example_code() -> str:
    text = (ROOT / "docs" / "custom-family.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _write_example(tmp_path: Path) -> Path:
    path = tmp_path / "my_families.py"
    path.write_text(_example_code())
    return path


def test_the_documented_family_works_from_the_api(tmp_path) -> None:
    path = _write_example(tmp_path)
    spec = importlib.util.spec_from_file_location("my_families", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = autobuild.convert("cifar_resnet20", "separable", options={"expand": 2})
    assert type(model.layer1[0].conv1).__name__ == "SeparableConv2d"
    assert model.layer1[0].conv1.depthwise.out_channels == 32
    a = autobuild.analyze("resnet18", input_size=(3, 64, 64))
    p = autobuild.Placement({"layer1.0.conv1": "separable:2", "layer2.0": "multiplicative"})
    built = a.build(p)
    assert a.cost(p).to_dict() == autobuild.count(built).to_dict()
    autobuild.save(built, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), loaded.eval()(x))
    autobuild.rewrite.trace(loaded)  # its layer is a registered leaf


def test_the_documented_family_works_from_the_cli(tmp_path) -> None:
    path = _write_example(tmp_path)
    noisy = tmp_path / "noisy.py"  # what a module prints must not break --json
    noisy.write_text("print('hello from noisy')\n")
    run = [sys.executable, "-m", "autobuild", "--import", str(path), "--import", str(noisy)]
    out = subprocess.run([*run, "convert", "cifar_resnet20", "--to", "separable", "--option",
                          "expand=2", "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "hello from noisy" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["family"] == "separable" and len(summary["sites"]) == 19  # stem too
    bad = subprocess.run([sys.executable, "-m", "autobuild", "--import", str(tmp_path / "no.py"),
                          "variants"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "no.py" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_broken_family_is_named_with_its_site(tmp_path, monkeypatch, capsys) -> None:
    """A family of one's own that raises, or builds a module of the wrong output shape, is
    an error naming it and the site (it was autobuild's "internal error (a bug)", or a
    torch error from a BatchNorm further on)."""
    import pytest

    from autobuild.errors import AutobuildError
    from autobuild.rewrite import family

    family.list_families()  # (the built-in ones loaded first, then registered here only)
    monkeypatch.setattr(family, "_FAMILIES", dict(family._FAMILIES))

    path = tmp_path / "broken_families.py"
    path.write_text(
        "from torch import nn\n"
        "import autobuild\n"
        "class Boom(autobuild.Variant):\n"
        "    name, summary, site_kinds = 'boom-test', 'raises', ('conv',)\n"
        "    def build(self, site, module, options, init):\n"
        "        raise RuntimeError('build failed')\n"
        "class Wide(autobuild.Variant):\n"
        "    name, summary, site_kinds = 'wide-test', 'one channel too many', ('conv',)\n"
        "    def build(self, site, module, options, init):\n"
        "        return nn.Conv2d(module.in_channels, module.out_channels + 1, 3, padding=1)\n"
        "autobuild.register_variant(Boom)\n"
        "autobuild.register_variant(Wide)\n")
    spec = importlib.util.spec_from_file_location("broken_families", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(AutobuildError, match=r"^family 'boom-test' \(from broken_families\) on "
                                             r"site layer1.0.conv1 failed: RuntimeError: build "
                                             r"failed$"):
        autobuild.convert("cifar_resnet20", "boom-test", sites="layer1.0.conv1")
    with pytest.raises(AutobuildError, match=r"on site layer1.0.conv1 failed: RuntimeError"):
        autobuild.analyze("cifar_resnet20").cost({"layer1.0.conv1": "boom-test"})
    with pytest.raises(AutobuildError, match=r"^family 'wide-test' .* on site layer1.0.conv1: "
                                             r"its Conv2d outputs \(17, 32, 32\) per sample, "
                                             r"the site \(16, 32, 32\)"):
        autobuild.convert("cifar_resnet20", "wide-test", sites="layer1.0.conv1")
    with pytest.raises(AutobuildError, match=r"its Conv2d outputs \(17, 32, 32\) per sample"):
        autobuild.analyze("cifar_resnet20").cost({"layer1.0.conv1": "wide-test"})  # (numbers)
    # On the command line, any exception raised in the code --import loaded is named as
    # raised there (exit 2), not as autobuild's "internal error (a bug)" (exit 1).
    from autobuild.cli import main

    picky = tmp_path / "picky_family.py"
    picky.write_text(
        "import autobuild\n"
        "class Picky(autobuild.Variant):\n"
        "    name, summary, site_kinds = 'picky-test', 'accepts() raises', ('conv',)\n"
        "    def accepts(self, site, options):\n"
        "        raise KeyError('oops')\n"
        "autobuild.register_variant(Picky, replace=True)\n")
    for argv in (["sites", "cifar_resnet20", "--to", "picky-test"],
                 ["convert", "cifar_resnet20", "--to", "picky-test"]):
        assert main(["--import", str(picky), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            "autobuild: error: KeyError: 'oops' (raised in code --import loaded, at "
            f"{picky}:5"), err


def test_a_graph_level_family_may_record_a_site_at_the_root_of_a_detector(monkeypatch) -> None:
    """A family that edits the graph and records its site at the traced root (as the Dirac
    family does) was checked as if the detector's whole backbone replaced one conv, and
    refused; a recorded path that is no module was an AttributeError (a bug)."""
    import pytest

    from autobuild.errors import AutobuildError
    from autobuild.rewrite import family

    family.list_families()
    monkeypatch.setattr(family, "_FAMILIES", dict(family._FAMILIES))

    class AtRoot(autobuild.Variant):
        name, summary, site_kinds = "at-root-test", "records the root", ("conv",)

        def apply(self, rewriter, site, options, init):
            rewriter.record_site(site)

    class Nowhere(AtRoot):
        name = "nowhere-test"

        def apply(self, rewriter, site, options, init):
            rewriter.record_site(site, "nowhere.conv")

    autobuild.register_variant(AtRoot)
    autobuild.register_variant(Nowhere)
    analysis = autobuild.analyze("ssdlite320_mobilenet_v3_large", num_classes=3)
    site = next(s for s in analysis.sites() if s.kind == "conv").name
    built = analysis.build({site: "at-root-test"})
    assert autobuild.site_modules(built) == {site: "backbone"}
    with pytest.raises(AutobuildError, match=r"it recorded the site at 'nowhere.conv', which is "
                                             r"not a module of the model"):
        analysis.build({site: "nowhere-test"})
