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
