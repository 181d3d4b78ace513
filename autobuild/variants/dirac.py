"""dirac: Dirac-parametrised plain networks (Zagoruyko & Komodakis, "DiracNets: Training Very
Deep Neural Networks Without Skip-Connections", arXiv 1706.00388, v2).

A Dirac conv computes ``conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖)``: δ is the identity kernel
(``conv2d(x, δ) = x``), ‖W_o‖ the L2 norm of output channel o's whole filter, and α, β are
per-output-channel vectors, α = 1 and β = 0.1 at initialisation (paper, v2 and the released
``diracconv.py``), exempt from weight decay (:data:`DiracConv2d.no_weight_decay_params`).
Where C_out > C_in the identity covers the first C_in outputs only, as
``torch.nn.init.dirac_`` builds it (per group for grouped convs).

Scopes (``--option scope=...``):

``network`` (default) turns a ResNet into a DiracNet: the residual additions are removed from
  the traced graph (the shortcut branches, projection convs included, disappear with them),
  every conv inside a residual block becomes a stride-1 Dirac conv, and a block conv that
  strided becomes ``MaxPool2d(s, ceil_mode=True)`` + the stride-1 Dirac conv, DiracNet's
  "down-sampling by max-pool between groups" (ceil_mode keeps the strided conv's output size
  on odd inputs; on even ones it is the paper's plain 2x2 max-pool). The stem, the pooling
  and the classifier stay. What remains, ``stem → [conv → BN → ReLU]* → pool → fc``, is the
  paper's ``[ReLU → Dirac conv → BN]*`` chain: ReLU commutes with max-pool and is idempotent,
  so the stem's ReLU is the first block's, and the last ReLU before pooling is the one the
  released (folded) DiracNet-18 applies. From resnet18 this gives DiracNet-18 (11.52M params,
  ImageNet top-1 error 30.37% in the paper), from resnet34 DiracNet-34 (21.64M): the
  paper's counts are ResNet's minus the projection shortcuts, plus α and β.
``convs`` Dirac-parametrises single convs (a module swap, skip connections kept): those with
  stride 1, an odd kernel and "same" padding, where δ is an identity. The stem (it reads the
  image) is a candidate but not a default site.

Inits. ``scratch``: W fresh (its scale is irrelevant, it is normalised), α = 1, β = 0.1.
``preserve`` (scope=convs only): W = the baseline filter, α = 0, β_o = ‖W_o‖, so the Dirac
conv computes exactly the baseline conv and learns its identity term from there (the
paper's α = 1 cannot preserve anything). A DiracNet removes the skip connections, which
changes the function, so scope=network refuses ``preserve``.

Folding (paper, section 3; the released models are folded): :func:`fold` turns each Dirac
conv and the eval-mode BN that directly follows it into one ``nn.Conv2d`` with a bias,
``W = (diag(α)δ + diag(β)W/‖W‖)·γ/sqrt(var+ε)``, ``b = β_BN + (b - mean)·γ/sqrt(var+ε)``, exact
to float precision. The folded model's plan is the same plan with ``folded=true``, which
``build_plan`` rebuilds as those plain convs (and ``nn.Identity`` where the BNs were), so a
folded model is saved and loaded as plan + weights like any other.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from autobuild.errors import AutobuildError, InfeasiblePlacement
from autobuild.rewrite import (
    BuildRecord,
    Change,
    Choice,
    Counts,
    Option,
    Placement,
    Region,
    Site,
    Variant,
    param_count,
    record_of,
    register_family,
    root_of,
    set_record,
    trace,
)
from autobuild.rewrite.cost import meta_twin
from autobuild.rewrite.graph import ancestors
from autobuild.variants._dirac_layers import (
    DiracConv1d,
    DiracConv2d,
    DiracConv3d,
    DiracConvNd,
    DiracConvV1,
    NCReLU,
    dirac_delta,
    dirac_problem,
)
from autobuild.variants.base import count_replacement

if TYPE_CHECKING:
    from autobuild.rewrite import Analysis, Rewriter

__all__ = ["DiracConv1d", "DiracConv2d", "DiracConv3d", "DiracConvNd", "DiracConvV1",
           "DiracVariant", "NCReLU", "dirac_delta", "fold"]

SCOPES = ("network", "convs")
def _branch_modules(analysis: Analysis) -> list[fx.Node]:
    """The module calls on the residual branches of every block (the shortcuts, projection
    convs included, disappear with the skip connections)."""
    branch_nodes: set[fx.Node] = set()
    for block in analysis.blocks.values():
        branch_nodes |= ancestors(block.branch, {block.input}) & block.members
    return [n for n in analysis.gm.graph.nodes if n in branch_nodes and n.op == "call_module"]


def _branch_convs(analysis: Analysis) -> list[fx.Node]:
    """The conv calls on the residual branches: what becomes Dirac convs."""
    gm = analysis.gm
    return [n for n in _branch_modules(analysis)
            if isinstance(gm.get_submodule(n.target), nn.Conv2d)]


def _is_other_conv(module: nn.Module) -> bool:
    """A layer that convolves but is not a plain nn.Conv2d (e.g. a quadratic conv): removing
    the skips around it would not make a DiracNet."""
    weight = getattr(module, "weight", None)
    return not isinstance(module, nn.Conv2d) and (
        hasattr(module, "kernel_size") or (isinstance(weight, torch.Tensor) and weight.dim() == 4))


def _network_problem(analysis: Analysis) -> str:
    if not analysis.blocks:
        return (f"{analysis.baseline.name} has no residual blocks to remove (a DiracNet is a "
                "ResNet without its skip connections; it applies to e.g. cifar_resnet20, "
                "resnet18, resnet34); use --option scope=convs to Dirac-parametrise single convs")
    calls = Counter(n.target for n in analysis.gm.graph.nodes if n.op == "call_module")
    for node in _branch_modules(analysis):
        module = analysis.gm.get_submodule(node.target)
        if _is_other_conv(module):
            return (f"{node.target} is a {type(module).__name__}, not an nn.Conv2d: only plain "
                    "convs become Dirac convs (convert the baseline, not a converted network)")
    if not _branch_convs(analysis):
        return "its residual branches hold no nn.Conv2d to Dirac-parametrise"
    for node in _branch_convs(analysis):
        problem = dirac_problem(analysis.gm.get_submodule(node.target), strided_ok=True)
        if calls[node.target] > 1:
            problem = "it is called more than once (shared weights)"
        if problem:
            return f"conv {node.target} cannot become a Dirac conv: {problem}; use " \
                   "--option scope=convs"
    return ""


def _diracnet(rewriter: Rewriter, site: Site, options: dict[str, Any]) -> None:
    """Remove every residual block's skip connection and make its branch convs Dirac convs;
    a strided conv becomes a max-pool + the stride-1 Dirac conv."""
    analysis = rewriter.analysis
    params_before = param_count(rewriter.root_module)
    for block in analysis.blocks.values():
        rewriter.remove_residual(block.add.name, block.branch.name)
    rewriter.prune()  # the shortcut branches, projection convs and BNs included
    gm = rewriter.graph()
    pairs = []
    for conv_node in _branch_convs(analysis):
        node = rewriter.node(conv_node.name)
        conv = gm.get_submodule(node.target)
        layer = DiracConv2d.from_conv(conv, strided_ok=True)
        note = ""
        if max(conv.stride) > 1:
            # DiracNet down-samples with max-pooling between groups, never with strides.
            stride = tuple(conv.stride)
            rewriter.insert_before(node, f"{node.target}_pool",
                                   nn.MaxPool2d(stride, stride, ceil_mode=True))
            note = f"stride {stride[0]} -> max-pool {stride[0]} + stride 1"
        path = rewriter.full(str(node.target))
        rewriter.replace_module(path, layer, site=site.name, note=note)
        pairs.append((path, _folding_bn(analysis, path)))
    revived = _revive_zero_norms(rewriter, [bn for _, bn in pairs if bn])
    rewriter.record_site(site)
    rewriter.record(site.name, type(analysis.baseline.root_module).__name__, "DiracNet",
                    params_before, param_count(rewriter.root_module),
                    f"{len(analysis.blocks)} skip connections removed" + (
                        f"; {revived} zero-initialised BN scales set to 1" if revived else ""))
    if options["folded"]:
        for conv_path, bn_path in pairs:
            _fold_one(rewriter, conv_path, bn_path, site.name)


@torch.no_grad()
def _revive_zero_norms(rewriter: Rewriter, bn_paths: Sequence[str]) -> int:
    """Set to 1 the scales of the block BNs that are all zero: the residual zero-init (timm's
    ``zero_init_last``, torchvision's ``zero_init_residual``) makes a block start as the
    identity through its skip; with the skip removed it would zero the network's signal and
    every gradient behind it. DiracNet's identity is its Dirac term instead."""
    revived = 0
    for path in bn_paths:
        bn = rewriter.model.get_submodule(path)
        weight = getattr(bn, "weight", None)
        if (isinstance(weight, torch.Tensor) and not weight.is_meta and weight.numel()
                and not weight.any()):
            weight.fill_(1.0)
            revived += 1
    return revived


def _folding_bn(analysis: Analysis, conv_path: str) -> str | None:
    """The BN folded into the conv at ``conv_path``: its only user, called once."""
    bn = analysis.site(conv_path).extra.get("bn") if conv_path in {
        s.name for s in analysis.sites()} else None
    if bn and len(analysis.call_nodes(bn)) == 1:
        module = analysis.baseline.module.get_submodule(bn)
        if getattr(module, "running_var", None) is not None:
            return bn
    return None


def _fold_one(rewriter: Rewriter, conv_path: str, bn_path: str | None, site: str) -> None:
    dirac = rewriter.model.get_submodule(conv_path)
    bn = rewriter.model.get_submodule(bn_path) if bn_path else None
    rewriter.replace_module(conv_path, dirac.folded(bn), site=site,
                            note=f"folded with {bn_path}" if bn_path else "folded")
    if bn_path:
        rewriter.replace_module(bn_path, nn.Identity(), site=site, note=f"folded into {conv_path}")


# ---- folding a trained model ----------------------------------------------------------------
@torch.no_grad()
def _fold_in_place(root: nn.Module, leaf_modules: Iterable[Any] = ()) -> list[Change]:
    """Swap every Dirac conv of ``root`` for the plain conv it computes, folding in the BN
    that is its only user (its module then becomes ``nn.Identity``)."""
    gm = trace(root, leaf_modules=leaf_modules)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    changes: list[Change] = []
    for node in list(gm.graph.nodes):
        # root, not gm: a shared Dirac conv's second call finds it already folded.
        if node.op != "call_module" or not isinstance(root.get_submodule(node.target),
                                                      (DiracConv2d, DiracConvNd)):
            continue
        dirac = root.get_submodule(node.target)
        bn_name, bn = None, None
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is not None and user.op == "call_module" and calls[node.target] == 1 \
                and calls[user.target] == 1:
            m = root.get_submodule(user.target)
            # A BN without running statistics normalises with batch statistics even in eval
            # mode: nothing to fold.
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                bn_name, bn = str(user.target), m
        conv = dirac.folded(bn)
        root.set_submodule(str(node.target), conv)
        if bn_name is not None:
            root.set_submodule(bn_name, nn.Identity())
        changes.append(Change(str(node.target), "dirac", type(dirac).__name__,
                              type(conv).__name__,
                              param_count(dirac) + (param_count(bn) if bn is not None else 0),
                              param_count(conv), f"folded with {bn_name}" if bn_name
                              else "folded"))
    return changes


def fold(model: nn.Module) -> nn.Module:
    """A new model in which each Dirac conv and the BN that follows it are one ``nn.Conv2d``
    (BN in eval mode, i.e. its running statistics): the plain ReLU → conv chain of the
    released DiracNets, equal to ``model`` in eval mode to float precision. Its plan is
    ``model``'s with ``folded=true``, so it saves and loads as plan + weights; a model whose
    baseline itself holds Dirac convs (a DiracNet preset) is refused, since its plan cannot
    say they are folded."""
    record = record_of(model)
    if record is not None:
        _refuse_baseline_diracs(model, record)
    new = copy.deepcopy(model)
    plan = record.plan if record is not None else None
    changes = _fold_in_place(root_of(new), plan.leaf_modules if plan is not None else ())
    if not changes:
        raise AutobuildError("the model has no Dirac convs to fold; convert it with --to dirac "
                             "first (a folded model is already plain)")
    if record is not None:
        placement = Placement({
            site: Choice.of(choice.family, {**choice.opts, "folded": True})
            if choice.family == DiracVariant.name else choice
            for site, choice in plan.placement.items()})
        set_record(new, BuildRecord(plan.replace(placement=placement), record.site_modules,
                                    record.changes + changes, record.root))
    return new


def _refuse_baseline_diracs(model: nn.Module, record: BuildRecord) -> None:
    """A plan marks its *dirac choices* folded; Dirac convs that the baseline itself holds (a
    DiracNet preset) would be rebuilt unfolded by the plan while the weights are folded."""
    owned = [record.site_modules.get(site, site) for site, choice in
             record.plan.placement.items() if choice.family == DiracVariant.name]
    for name, module in root_of(model).named_modules():
        if isinstance(module, (DiracConv2d, DiracConvNd)) and not any(
                path in ("", "network") or name == path or name.startswith(path + ".")
                for path in owned):
            raise AutobuildError(
                f"{name} is a Dirac conv of the baseline {record.plan.model!r} itself, which a "
                "plan cannot mark folded (the saved model would rebuild unfolded); fold a "
                "network converted with --to dirac, or call .folded() on the layers in Python")


# ---- the family -----------------------------------------------------------------------------
class DiracVariant(Variant):
    name = "dirac"
    summary = ("DiracNet: skip connections removed, convs as diag(α)δ + diag(β)W/‖W‖ "
               "(foldable into plain convs)")
    paper = "DiracNets v2 (Zagoruyko & Komodakis, arXiv 1706.00388)"
    site_kinds = ("network", "conv")
    options = (
        Option("scope", "network", "network: a ResNet becomes a DiracNet (skips removed, "
               "block convs Dirac, strides -> max-pool); convs: Dirac-parametrise single "
               "stride-1 convs, skips kept", SCOPES),
        Option("folded", False, "build the inference form: each Dirac conv and its BN as one "
               "plain conv with bias (what `autobuild fold` saves)", type=bool),
    )
    primary_option = "scope"
    inits = ("scratch", "preserve")
    leaf_modules = (DiracConv2d, DiracConvNd)
    example_models = ("cifar_resnet20", "resnet18", "resnet34", "cifar_vgg16")
    mask_effect = ("each Dirac conv's filter term β·W/‖W‖: the conv applies only its identity "
                   "term α·δ (folded convs have nothing to mask)")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        model = self.example_models[0]
        return [(model, {"scope": scope, "folded": folded}, None)
                for scope in SCOPES for folded in (False, True)]

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        if options["scope"] == "network":
            return site.kind == "network"
        return (site.kind == "conv" and site.module_type == "Conv2d" and site.stride == 1
                and all(k % 2 == 1 for k in site.kernel_size)
                and site.input_shape[1:] == site.output_shape[1:])

    def refusal(self, site: Site, options: dict[str, Any], analysis: Analysis) -> str:
        if options["scope"] == "network":
            return _network_problem(analysis)
        if site.call >= 0:
            return (f"{site.target} is one conv called several times; its calls share one "
                    "weight, which a Dirac parametrisation of one call would split")
        return dirac_problem(analysis.module(site))

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """scope=convs: every candidate but the stem (DiracNet's stem is a plain conv; an
        identity from 3 image channels means nothing)."""
        return [s for s in candidates if not s.extra.get("stem")]

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str,
              analysis: Analysis) -> None:
        super().check(sites, options, init, analysis)
        if init == "preserve" and options["scope"] == "network":
            raise InfeasiblePlacement(
                "dirac scope=network removes the skip connections, which changes the function, "
                "so --init preserve is impossible; use --init scratch, or --option scope=convs "
                "--init preserve")

    def region(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Region:
        region = analysis.region(site.name)
        bn = _folding_bn(analysis, site.name) if site.kind == "conv" else None
        if options["folded"] and bn:
            region = region | Region(analysis.call_nodes(bn), frozenset({bn}))
        return region

    def cost(self, site: Site, options: dict[str, Any], analysis: Analysis) -> Counts:
        if options["scope"] == "network":
            return analysis.applied_cost(self, site, options)
        bn = _folding_bn(analysis, site.name) if options["folded"] else None
        with torch.device("meta"):
            layer = self.build(site, analysis.meta_module(site), options, "scratch")
            if options["folded"]:
                bn_module = meta_twin(analysis.baseline.module.get_submodule(bn)) if bn else None
                layer = layer.folded(bn_module)
        return count_replacement(layer, site.input_shape)

    def apply(self, rewriter: Rewriter, site: Site, options: dict[str, Any], init: str) -> None:
        if options["scope"] == "network":
            _diracnet(rewriter, site, options)
            return
        rewriter.replace(site, self.build(site, rewriter.module(site), options, init))
        if options["folded"]:
            _fold_one(rewriter, site.target, _folding_bn(rewriter.analysis, site.name),
                      site.name)

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        layer = DiracConv2d.from_conv(module)
        if init == "preserve":
            layer.preserve(module.weight, module.bias)
        return layer


register_family(DiracVariant)
