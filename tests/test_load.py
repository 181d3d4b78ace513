"""``autobuild.load`` builds on the meta device and assigns the saved tensors: nothing is
initialised only to be overwritten, and the model is the saved one, bit for bit."""

from __future__ import annotations

import pytest
import torch

import autobuild
import autobuild.api
from autobuild.variants import list_variants

FAMILIES = [v.name for v in list_variants()]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_skips_initialisation_and_is_bit_exact(family, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = autobuild.convert("cifar_resnet20", family).eval()
    autobuild.save(model, tmp_path / "m")

    devices = []
    build_plan = autobuild.api.build_plan

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        devices.append(kwargs.get("device"))
        return build_plan(*args, **kwargs)

    monkeypatch.setattr(autobuild.api, "build_plan", recording)
    loaded = autobuild.load(tmp_path / "m").eval()
    assert devices == ["meta"], f"{family}: load fell back to a real build ({devices})"

    before = dict(model.named_buffers()) | dict(model.named_parameters())
    after = dict(loaded.named_buffers()) | dict(loaded.named_parameters())
    assert before.keys() == after.keys()  # non-persistent buffers (Dirac's δ) included
    for name, tensor in before.items():
        assert after[name].device.type == "cpu", name
        assert torch.equal(after[name], tensor), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert autobuild.plan_of(loaded) == autobuild.plan_of(model)
