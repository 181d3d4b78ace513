"""Placements: canonical form and key, every conflict refused before building, cost predicted
without building equal to the count of the built model, masking, mixed families end to end."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torchvision

import autobuild
from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.io import load_placement
from autobuild.models import resolve_baseline
from autobuild.rewrite import Analysis, Choice, Placement, Plan, masked, record_of, trace
from autobuild.rewrite.plan import Conversion
from autobuild.variants import list_variants

_ANALYSES: dict[tuple[str, str | None], Analysis] = {}


def _analysis(name: str, device: str | None = None) -> Analysis:
    """One analysis per baseline for the whole module (device="meta": structure only)."""
    if (name, device) not in _ANALYSES:
        torch.manual_seed(0)
        _ANALYSES[name, device] = Analysis(resolve_baseline(name, device=device))
    return _ANALYSES[name, device]


# ---- canonical form ----------------------------------------------------------------------
def test_equal_placements_have_equal_keys_whatever_the_spelling_and_order() -> None:
    a = Placement({"layer1.0.conv1": "quadratic:ours", "layer2.0": "multiplicative",
                   "fc": "keep"})
    b = Placement({"layer2.0": {"family": "multiplicative", "options": {"layout": "plain"}},
                   "layer1.0.conv1": {"family": "quadratic", "type": "ours",
                                      "volterra_max_params": "8000000"}})
    c = Placement({"layer1.0.conv1": "quadratic", "layer2.0": "multiplicative:plain"})
    assert a == b == c and a.key == b.key == c.key
    assert list(a) == ["layer1.0.conv1", "layer2.0"]  # sorted, keep dropped
    assert a["layer1.0.conv1"].opts["volterra_max_params"] == 8_000_000  # defaults filled
    different = [Placement({"layer1.0.conv1": "quadratic:t4", "layer2.0": "multiplicative"}),
                 Placement({"layer1.0.conv1": "quadratic:ours"}),
                 Placement({"layer1.0.conv2": "quadratic:ours", "layer2.0": "multiplicative"}),
                 Placement({"layer1.0.conv1": "quadratic:ours",
                            "layer2.0": "multiplicative:hardball=none"}),
                 Placement()]
    keys = {p.key for p in different} | {a.key}
    assert len(keys) == len(different) + 1
    assert Placement().summary() == "baseline"
    assert a.summary() == "multiplicative:plain x1, quadratic:ours x1"


@pytest.mark.parametrize("variant", list_variants(), ids=lambda v: v.name)
def test_a_choice_label_reads_back_as_the_same_choice(variant) -> None:
    """What convert, reports and the search show for a choice can be pasted into a
    placement: the short label parses back to the choice (defaults filled in)."""
    for _, options, _ in variant.contract_cases():
        choice = Choice.of(variant.name, options)
        assert Choice.parse(choice.short()) == choice, choice.short()


def test_placement_round_trips_through_a_plan_and_a_file(tmp_path) -> None:
    p = Placement({"layer1.0.conv1": "quadratic:t4", "layer1.0.conv2": "quadratic:t4",
                   "layer3": "pde-global:coeffs=constant,K=2"})
    plan = Plan("cifar_resnet20", p, "scratch", 10, (3, 32, 32))
    assert [c.sites for c in plan.conversions] == [["layer3"],
                                                   ["layer1.0.conv1", "layer1.0.conv2"]]
    again = Plan.loads(plan.dumps())
    assert again.placement == p and again.placement.key == p.key
    path = tmp_path / "placement.yaml"
    path.write_text("layer1.0.conv1: quadratic:t4\nlayer1.0.conv2: {family: quadratic, "
                    "type: t4}\nlayer3: pde-global:coeffs=constant,K=2\nfc: keep\n")
    assert load_placement(str(path)) == p
    (tmp_path / "plan.yaml").write_text(plan.dumps())
    assert load_placement(str(tmp_path / "plan.yaml")) == p
    # a site given twice is refused, not decided by whichever line comes last
    path.write_text("layer1.0.conv1: quadratic:t4\nlayer1.0.conv1: keep\n")
    with pytest.raises(AutobuildError, match="key 'layer1.0.conv1' is given twice \\(line 2\\)"):
        load_placement(str(path))


def test_a_boolean_option_takes_every_spelling_its_message_lists() -> None:
    for value in (True, 1, "1", "true", "yes", "on"):
        assert Placement({"layer1.0.conv1": {"family": "dirac", "folded": value}})[
            "layer1.0.conv1"].opts["folded"] is True
    for value in (False, 0, "0", "false", "no", "off"):
        assert Placement({"layer1.0.conv1": {"family": "dirac", "folded": value}})[
            "layer1.0.conv1"].opts["folded"] is False
    with pytest.raises(AutobuildError, match="folded=2 of dirac must be true or false"):
        Placement({"layer1.0.conv1": {"family": "dirac", "folded": 2}})


@pytest.mark.parametrize("value,needle", [
    ("cubic", "unknown family 'cubic'"),
    ("quadratic:t9", "valid: ours, t2"),
    ("quadratic:kind=ours", "unknown option of quadratic 'kind'"),
    ("pde-global:K=2.5", "K=2.5 of pde-global must be an integer"),
    ("dirac:folded=2", "folded=2 of dirac must be true or false (or yes/no, on/off, 1/0)"),
    ("pde-global:dt=inf", "dt=inf of pde-global must be a finite number > 0.0"),
    ("pde-global:dt=nan", "dt=nan of pde-global must be a finite number > 0.0"),
    ("pde-global:dt=-1", "dt=-1.0 of pde-global must be > 0.0"),
    ({"type": "ours"}, "needs a 'family'"),
    (3, "must be 'keep'"),
    ("quadratic:type=ours,volterra_max_params", "options are name=value"),
    # each was accepted, and decided something the user did not write
    ("quadratic:type=t4,type=t3", "option 'type' is given twice"),
    (None, "choice for site layer1.0.conv1 is empty (None); write 'keep'"),
    ({"family": "keep", "type": "t4"}, "keep takes no options"),
])
def test_bad_choices_are_refused(value, needle) -> None:
    with pytest.raises(AutobuildError, match=re.escape(needle)):
        Placement({"layer1.0.conv1": value})


def test_a_site_named_twice_in_a_plan_is_refused() -> None:
    with pytest.raises(InfeasiblePlacement, match="layer1.0.conv1 is named twice"):
        Plan("cifar_resnet20", [Conversion("quadratic", {}, ["layer1.0.conv1"]),
                                Conversion("parameter-free", {}, ["layer1.0.conv1"])])


# ---- conflicts ---------------------------------------------------------------------------
def _overlapping_pair(a: Analysis, fa, fb):
    """Sites sa (fa), sb (fb), sa != sb, whose regions overlap; None if there are none."""
    oa, ob = fa.parse_options({}), fb.parse_options({})
    for sa in a.sites(fa.name, oa):
        ra = fa.region(sa, oa, a)
        for sb in a.sites(fb.name, ob):
            if sb.name != sa.name and ra.overlaps(fb.region(sb, ob, a)):
                return sa, sb
    return None


@pytest.mark.parametrize("fa,fb", [
    pytest.param(x, y, id=f"{x.name}+{y.name}")
    for x, y in itertools.combinations_with_replacement(list_variants(), 2)])
def test_every_pairwise_family_conflict_is_refused_naming_both_sites(fa, fb) -> None:
    a = _analysis("resnet18", "meta")
    pair = _overlapping_pair(a, fa, fb)
    if pair is None:  # both take the same kind of site: the same site twice
        site = a.sites(fa.name)[-1].name
        with pytest.raises(InfeasiblePlacement, match=f"site {site} is named twice"):
            Plan("resnet18", [Conversion(fa.name, {}, [site]), Conversion(fb.name, {}, [site])])
        return
    sa, sb = pair
    p = Placement({sa.name: Choice.of(fa.name), sb.name: Choice.of(fb.name)})
    with pytest.raises(InfeasiblePlacement) as err:
        a.check(p)
    message = str(err.value)
    assert sa.name in message and sb.name in message and "overlap" in message
    with pytest.raises(InfeasiblePlacement):
        a.build(p)  # refused before building too


def test_other_refusals_happen_in_check() -> None:
    a = _analysis("cifar_resnet20", "meta")
    with pytest.raises(InfeasiblePlacement, match="cifar_resnet20 has no site 'layer9'"):
        a.check({"layer9": "pde-global"})
    with pytest.raises(InfeasiblePlacement, match="does not convert site layer1.0.conv1, a conv"):
        a.check({"layer1.0.conv1": "multiplicative"})
    with pytest.raises(InfeasiblePlacement, match="volterra would have"):
        a.check({"layer3.0.conv2": "quadratic:volterra"})
    with pytest.raises(InfeasiblePlacement, match="preserve"):
        a.check({"layer1": "pde-global"}, init="preserve")
    with pytest.raises(InfeasiblePlacement, match="cifar_resnet"):
        _analysis("resnet18", "meta").check({"network": "pde-global:paper"})


def test_a_stage_converted_by_pde_global_keeps_its_first_block_for_others() -> None:
    a = _analysis("cifar_resnet20", "meta")
    p = Placement({"layer3": "pde-global", "layer3.0.conv1": "quadratic:ours",
                   "layer3.0": "keep"})
    a.check(p)
    m = a.build(p)
    assert type(m.layer3[0].conv1).__name__ == "QuadraticConv2d"
    assert type(m.layer3.pde).__name__ == "GlobalLayer"
    with pytest.raises(InfeasiblePlacement, match="layer3.1.conv1"):
        a.check({"layer3": "pde-global", "layer3.1.conv1": "quadratic"})


# ---- cost before building ----------------------------------------------------------------
def _cases(model: str):
    a = _analysis(model, "meta")
    for v in list_variants():
        for _, options, sites in v.contract_cases():
            try:
                placement = a.select(v.name, sites, options)
                a.cost(placement)  # checks the options against this baseline
            except AutobuildError:
                continue  # the family has no such site in this baseline
            yield v.name, options, placement


@pytest.mark.parametrize("model", ["cifar_resnet20", "resnet18", "resnet50", "cifar_vgg16",
                                   "vit_micro_cifar"])
def test_cost_before_building_equals_the_count_of_the_built_model(model: str) -> None:
    a = _analysis(model, "meta")
    seen = set()
    for family, options, placement in _cases(model):
        predicted = a.cost(placement)
        counted = autobuild.count(a.build(placement), a.baseline.input_size)
        assert (predicted.params, predicted.macs, predicted.flops) == \
               (counted.params, counted.macs, counted.flops), (family, options)
        seen.add(family)
    # A ViT's default sites are its attentions (parameter-free); linears convert when named.
    assert (len(seen) >= 3) if not model.startswith("vit") else "parameter-free" in seen, seen
    assert a.cost(Placement()).to_dict() == a.counts.to_dict()


def test_cost_of_a_mixed_placement_and_of_shared_call_sites() -> None:
    a = _analysis("resnet50", "meta")
    p = _mixed()
    assert a.cost(p).to_dict() == autobuild.count(a.build(p), (3, 224, 224)).to_dict()
    from tests.rewrite.test_sites import Shared

    shared = Analysis(resolve_baseline(Shared(), input_size=(3, 8, 8)))
    for p in (Placement({"conv#1": "quadratic:ours"}),
              Placement({"conv#0": "quadratic", "conv#1": "quadratic:t2"})):
        assert shared.cost(p).to_dict() == autobuild.count(shared.build(p), (3, 8, 8)).to_dict()


class _Tied(torch.nn.Module):
    """Two convs sharing one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("sites", [["a"], ["b"], ["a", "b"]])
def test_cost_counts_a_tied_weight_once_and_keeps_it_while_a_layer_uses_it(sites) -> None:
    """The shared tensor was subtracted once per converted layer (and also when the other
    layer still used it): the prediction differed from the count."""
    a = Analysis(resolve_baseline(_Tied(), input_size=(3, 8, 8)))
    p = Placement({s: "quadratic" for s in sites})
    assert a.cost(p).to_dict() == autobuild.count(a.build(p), (3, 8, 8)).to_dict()


def test_the_analysis_runs_on_the_meta_device_and_builds_without_retracing(monkeypatch) -> None:
    a = _analysis("resnet50")
    calls = []
    import autobuild.rewrite.rewriter as rewriter

    monkeypatch.setattr(rewriter, "trace", lambda *args, **kw: calls.append(1))
    a.build(_mixed())
    a.build({"layer1.0.relu#1": "keep", "network": "dirac"})
    assert calls == []


# ---- mixed placements end to end ---------------------------------------------------------
def _mixed() -> Placement:
    return Placement({"layer1.0.conv2": "quadratic:ours", "layer2.0": "multiplicative",
                      "layer3": "pde-global", "layer4.0.conv2": "parameter-free",
                      "layer4.1.conv1": "dirac:convs"})


def test_a_mixed_placement_of_five_families_builds_saves_loads_and_retraces(tmp_path) -> None:
    a = _analysis("resnet50")
    torch.manual_seed(0)
    m = a.build(_mixed(), init="scratch")
    record = record_of(m)
    assert record.plan.placement == _mixed() and record.plan.family == "mixed"
    assert record.site_modules == {s: s for s in _mixed()}
    kinds = {name: type(m.get_submodule(path)).__name__
             for name, path in record.site_modules.items()}
    assert kinds == {"layer1.0.conv2": "QuadraticConv2d", "layer2.0": "QLBlock",
                     "layer3": "Sequential", "layer4.0.conv2": "ParameterFreeLayer",
                     "layer4.1.conv1": "DiracConv2d"}
    assert type(m.layer4[0].bn2).__name__ == "Identity"  # PfLayer: no BN after the pool
    autobuild.save(m, str(tmp_path / "run"))
    loaded = autobuild.load(str(tmp_path / "run"))
    assert autobuild.plan_of(loaded) == record.plan
    assert autobuild.site_modules(loaded) == record.site_modules
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    trace(loaded)
    again = autobuild.analyze(loaded, input_size=(3, 64, 64))
    assert "layer1.0.conv2" not in {s.name for s in again.sites("quadratic")}  # a leaf now


def test_converting_a_converted_model_keeps_both_conversions(tmp_path) -> None:
    first = autobuild.convert("cifar_resnet20", "quadratic", sites=["layer1.0.conv1"],
                              init="preserve")
    both = autobuild.convert(first, "multiplicative", sites=["layer2.0"])
    plan = autobuild.plan_of(both)
    assert dict(plan.placement) == {"layer1.0.conv1": Choice.of("quadratic"),
                                    "layer2.0": Choice.of("multiplicative")}
    assert plan.init == "scratch"
    assert torch.equal(both.layer1[0].conv1.weight, first.layer1[0].conv1.weight)
    autobuild.save(both, str(tmp_path / "both"))
    loaded = autobuild.load(str(tmp_path / "both"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(both.eval()(x), loaded.eval()(x))
    with pytest.raises(InfeasiblePlacement, match="layer1.0.conv1 .* and layer1.0 .* overlap"):
        autobuild.convert(first, "multiplicative", sites=["layer1.0"])
    with pytest.raises(InfeasiblePlacement, match="already converted"):
        autobuild.convert(first, "quadratic", sites=["layer1.0.conv1"])


def test_converting_again_accepts_what_one_placement_accepts_and_nothing_else(tmp_path) -> None:
    """Converting in two steps takes exactly the combined placements that build in one: a
    site inside a network-wide conversion was accepted (a model load() then refused), and
    a block inside a pde-global stage, which one placement takes, was refused."""
    dirac = autobuild.convert("cifar_resnet20", "dirac")
    with pytest.raises(InfeasiblePlacement, match="fc .* and network .* overlap"):
        autobuild.convert(dirac, "quadratic", sites=["fc"])
    # a preserving second step on a scratch first is a scratch plan, as load() builds it
    pf = autobuild.convert("cifar_resnet20", "parameter-free", sites="layer3.*")
    mixed = autobuild.convert(pf, "quadratic", sites="layer1.0.conv1", init="preserve")
    assert autobuild.plan_of(mixed).init == "scratch"
    stage = autobuild.convert("cifar_resnet20", "pde-global", sites="layer2")
    both = autobuild.convert(stage, "multiplicative", sites="layer2.0")
    autobuild.save(both, str(tmp_path / "both"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(both.eval()(x), autobuild.load(str(tmp_path / "both")).eval()(x))


def test_a_custom_model_converted_again_takes_what_one_placement_takes(tmp_path) -> None:
    """Without a registered baseline the converted model's own modules tell what is taken:
    a plain pde-global stage keeps its first block, which one placement lets another family
    convert, and so does a second step; a site inside a converted layer stays refused."""
    def resnet() -> torch.nn.Module:
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10)

    one = autobuild.analyze(resnet(), input_size=(3, 64, 64)).build(
        Placement({"layer1": "pde-global", "layer1.0.conv1": "quadratic"}))
    stage = autobuild.convert(resnet(), "pde-global", sites=["layer1"], input_size=(3, 64, 64))
    both = autobuild.convert(stage, "quadratic", sites=["layer1.0.conv1"])
    assert dict(autobuild.plan_of(both).placement) == dict(autobuild.plan_of(one).placement)
    autobuild.save(both, str(tmp_path / "both"))
    loaded = autobuild.load(str(tmp_path / "both"), baseline=resnet())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(both.eval()(x), loaded.eval()(x))
    conv = autobuild.convert(resnet(), "quadratic", sites=["layer2.0.conv1"],
                             input_size=(3, 64, 64))
    with pytest.raises(InfeasiblePlacement, match="layer2.0.conv1 .* and layer2.0 .* overlap"):
        autobuild.convert(conv, "multiplicative", sites=["layer2.0"])


# ---- masking -----------------------------------------------------------------------------
def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Weights off their init (where a product term or a BN gamma starts at 0), BN stats
    realistic, so that switching a part off must change the output."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim <= 1 else 0.05))
    return model


MASK_CASES = [
    pytest.param(v.name, model, options, sites, id=f"{v.name}-{model}-" + "-".join(
        f"{k}={o}" for k, o in options.items()))
    for v in list_variants() for model, options, sites in v.contract_cases()]


@pytest.mark.parametrize("family,model,options,sites", MASK_CASES)
def test_masking_switches_the_part_off_and_restores_exactly(family, model, options,
                                                            sites) -> None:
    a = _analysis(model)
    site, choice = next(iter(a.select(family, sites, options).items()))
    m = _randomised(a.build(Placement({site: choice})))
    x = torch.randn(2, *a.baseline.input_size)
    keys = set(m.state_dict())
    if options.get("folded"):  # folded Dirac convs are plain convs: nothing to mask
        with pytest.raises(AutobuildError, match="nothing to mask"), masked(m, [site]):
            pass
        return
    # (training with gradients runs fused ops in some families: they must honour it too)
    for mode, grad in (("eval", False), ("train", False), ("train", True)):
        getattr(m, mode)()
        with torch.set_grad_enabled(grad):
            before = m(x).detach()
            with autobuild.masked(m, [site]):
                off = m(x).detach()
                assert set(m.state_dict()) == keys
            after = m(x).detach()
        if mode == "eval":
            assert torch.equal(before, after)
        assert not torch.allclose(before, off), \
            f"masking {site} changed nothing ({mode}, grad={grad})"
    m.train()
    with autobuild.masked(m, site):  # a single name works too, and so does backward
        m(x).square().mean().backward()


def test_masking_refuses_sites_that_are_not_converted() -> None:
    m = autobuild.convert("cifar_resnet20", "quadratic", sites=["layer1.0.conv1"])
    with pytest.raises(AutobuildError, match="layer1.0.conv2 is not converted"), \
            masked(m, ["layer1.0.conv2"]):
        pass
    with pytest.raises(AutobuildError, match="no build record"), \
            masked(torch.nn.Linear(2, 2), ["x"]):
        pass


def test_idle_options_are_refused_as_new_input_only(tmp_path) -> None:
    """convert(to=..., options=...) refuses an option that changes nothing; a placement or a
    saved plan that holds one (written before the refusal existed) still builds and loads."""
    with pytest.raises(InfeasiblePlacement, match="option memory=save of quadratic changes "
                                                  "nothing"):
        autobuild.convert("cifar_resnet20", to="quadratic", options={"type": "t4",
                                                                     "memory": "save"})
    m = autobuild.convert("cifar_resnet20",
                          placement={"layer1.0.conv1": "quadratic:type=t4,memory=save"})
    autobuild.save(m, str(tmp_path / "old"))
    assert autobuild.plan_of(autobuild.load(str(tmp_path / "old"))) == autobuild.plan_of(m)


def test_describe_says_where_each_choice_goes() -> None:
    """Search reports label trials with it: two placements with the same counts on other
    stages used to read the same ("quadratic:ours x6")."""
    convs = {f"layer{s}.{b}.conv{c}": "quadratic:ours" for s in (1, 3) for b in range(3)
             for c in (1, 2)}
    stage1 = Placement({k: v for k, v in convs.items() if k.startswith("layer1")})
    stage3 = Placement({k: v for k, v in convs.items() if k.startswith("layer3")})
    assert stage1.summary() == stage3.summary()
    assert stage1.describe() == "quadratic:ours x6 in layer1.*"
    assert stage3.describe() == "quadratic:ours x6 in layer3.*"
    mixed = Placement({**convs, "layer2": "pde-global", "fc": "quadratic:ours"})
    assert mixed.describe() == ("pde-global:plain x1 in layer2; quadratic:ours x13 in "
                                "fc,layer1.*,layer3.*")
    assert Placement({"conv1": "dirac", "layer2.0.conv1": "dirac"}).describe() == \
        "dirac:network x2 in conv1,layer2.0.conv1"
    assert Placement().describe() == "baseline"
