"""``autobuild.load`` builds on the meta device and assigns the saved tensors: nothing is
initialised only to be overwritten, and the model is the saved one, bit for bit."""

from __future__ import annotations

import pytest
import torch

import autobuild
import autobuild.api
from autobuild.errors import AutobuildError
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


def test_a_fan_model_saved_before_its_output_bias_loads_as_it_was(tmp_path) -> None:  # noqa: ANN001
    """Plan version 2 wrote fan without the output bias c (``bias_sq``): its weights lack
    it and load fills c = 0, the neuron they were trained as; a version-3 file lacking it is
    still refused."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = autobuild.convert("cifar_resnet20", "quadratic", options={"type": "fan"}).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias_sq"):
            p.data.zero_()
    autobuild.save(model, tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.endswith("bias_sq")}
    assert len(state) < len(load_file(weights))
    save_file(state, weights)
    with pytest.raises(autobuild.AutobuildError, match="missing"):
        autobuild.load(tmp_path / "m")
    plan_file = next((tmp_path / "m").glob("plan.*"))
    text = plan_file.read_text()
    assert "autobuild_plan: 3" in text
    plan_file.write_text(text.replace("autobuild_plan: 3", "autobuild_plan: 2"))
    loaded = autobuild.load(tmp_path / "m").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_what_a_plan_says_wrong_is_named_by_its_file(tmp_path) -> None:  # noqa: ANN001
    """A plan edited into one that does not build: the error names the plan file (it named
    a flag, --init preserve, the user never gave)."""
    out = str(tmp_path / "m")
    autobuild.save(autobuild.convert("cifar_resnet20", "quadratic", sites=["layer1.0.conv1"],
                                     init="preserve"), out)
    plan = tmp_path / "m" / "plan.yaml"
    plan.write_text(plan.read_text().replace("type: ours", "type: t4"))
    with pytest.raises(AutobuildError, match=r"m/plan.yaml: quadratic type t4 .* cannot "
                                             "preserve"):
        autobuild.load(out)
