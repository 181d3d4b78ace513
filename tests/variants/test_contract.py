"""Contract tests that every registered family passes, driven by the registry: adding a
family file adds its cases here automatically (Variant.contract_cases)."""

from __future__ import annotations

import copy

import pytest
import torch

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import resolve_baseline
from autobuild.rewrite import trace
from autobuild.variants import list_variants
from tests.conftest import convert_baseline, max_rel_diff

CASES = [
    pytest.param(v.name, model, options, sites,
                 id=f"{v.name}-{model}-{'-'.join(f'{k}={o}' for k, o in options.items())}"
                    + (f"-{'+'.join(sites)}" if sites else ""))
    for v in list_variants() for model, options, sites in v.contract_cases()
]

_BASELINES: dict[str, object] = {}


def _baseline(name: str):
    if name not in _BASELINES:
        torch.manual_seed(0)
        _BASELINES[name] = resolve_baseline(name)
    return _BASELINES[name]


def test_every_builtin_family_is_registered() -> None:
    names = {v.name for v in list_variants()}
    assert "quadratic" in names
    for v in list_variants():
        assert v.site_kinds and v.summary and v.paper and v.leaf_modules, v.name


@pytest.mark.parametrize("family,model,options,sites", CASES)
def test_contract(family: str, model: str, options: dict, sites: list | None, tmp_path) -> None:
    base = _baseline(model)
    torch.manual_seed(0)
    converted = convert_baseline(base, family, sites=sites, options=options)
    m = converted.model
    assert converted.changes, "the conversion changed nothing"
    assert autobuild.plan_of(m) is converted.plan
    assert autobuild.plan_of(m) == converted.analysis.plan(converted.plan.placement)
    x = torch.randn(2, *base.input_size)

    # Shapes: same output as the baseline.
    base.module.eval()
    with torch.no_grad():
        y_base = base.module(x)
    m.train()
    y = m(x)
    assert y.shape == y_base.shape
    assert torch.isfinite(y).all()

    # Gradients reach the converted layers and are finite.
    y.square().mean().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # A converted model can be traced again (its layers are leaves) and re-sited.
    trace(m)
    autobuild.analyze(m, input_size=base.input_size) if not base.root else None

    # The plan rebuilds the same structure; save/load reproduces outputs bit for bit.
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    rebuilt = autobuild.build_plan(converted.plan, load_baseline_weights=False)
    rebuilt.load_state_dict(m.state_dict())
    rebuilt.eval()
    autobuild.save(m, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), y_eval)
        assert torch.equal(loaded(x), y_eval)
    assert autobuild.plan_of(loaded).to_dict() == converted.plan.to_dict()

    # channels_last (`autobuild train`'s default on CUDA) computes the same function.
    if not base.root:
        loaded.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert max_rel_diff(y_eval, loaded(x_cl)) <= 1e-4
        loaded.train()
        loaded(x_cl).square().mean().backward()


@pytest.mark.parametrize("family,model,options,sites", CASES)
def test_new_layers_train_in_a_frozen_baseline(family: str, model: str, options: dict,
                                               sites: list | None) -> None:
    """New layers are trainable whatever the layers they replace were (README): only the
    baseline's own, unchanged parameters keep their requires_grad=False."""
    base = copy.deepcopy(_baseline(model))
    base.module.requires_grad_(False)
    kept = dict(base.module.named_parameters())
    m = convert_baseline(base, family, sites=sites, options=options).model
    # (a new layer under a baseline layer's name has new values: init scratch)
    frozen = [name for name, p in m.named_parameters() if not p.requires_grad and not (
        name in kept and torch.equal(p, kept[name]))]
    assert frozen == []


@pytest.mark.parametrize("family,model,options,sites", CASES)
def test_preserve_contract(family: str, model: str, options: dict, sites: list | None) -> None:
    """Where a family offers init=preserve, the converted net computes the baseline's
    function in eval mode; where it cannot, it refuses with a message saying so."""
    variant = next(v for v in list_variants() if v.name == family)
    base = _baseline(model)
    base.module.eval()  # converted as it is: in eval mode, new layers included
    if "preserve" not in variant.inits:
        with pytest.raises(AutobuildError, match="preserve"):
            convert_baseline(base, family, sites=sites, options=options, init="preserve")
        return
    try:
        m = convert_baseline(base, family, sites=sites, options=options, init="preserve").model
    except AutobuildError as exc:
        assert "preserve" in str(exc)
        return
    assert not any(layer.training for layer in m.modules())
    x = torch.randn(2, *base.input_size)
    with torch.no_grad():
        assert max_rel_diff(base.module(x), m(x)) <= 1e-4


@pytest.mark.parametrize("model", ["cifar_resnet20", "cifar_vgg11", "resnet18", "ssd300_vgg16"])
@pytest.mark.parametrize("family", [v.name for v in list_variants()])
def test_every_family_on_every_kind_of_baseline(family: str, model: str) -> None:
    """Each family converts each kind of baseline where its site kind exists; elsewhere
    the error says so and names models it applies to."""
    base = _baseline(model)
    try:
        converted = convert_baseline(base, family)
    except AutobuildError as exc:
        assert "applies to" in str(exc) or "no default site" in str(exc), str(exc)
        return
    m = converted.model
    m.eval()
    with torch.no_grad():
        if model.startswith("ssd"):
            out = m([torch.rand(3, 300, 300)])
            assert out[0]["boxes"].shape[-1] == 4
        else:
            x = torch.randn(1, *base.input_size)
            assert m(x).shape == base.module.eval()(x).shape
