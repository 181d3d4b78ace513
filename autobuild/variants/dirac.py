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
``apply_plan`` rebuilds as those plain convs (and ``nn.Identity`` where the BNs were), so a
folded model is saved and loaded as plan + weights like any other.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.utils import _pair

from autobuild.errors import AutobuildError
from autobuild.ops.common import NoAutocast, autocast_cast, autocast_dtype, fused_ok
from autobuild.ops.dirac import dirac_conv2d, dirac_weight
from autobuild.rewrite.plan import Plan
from autobuild.rewrite.rewriter import Change, Rewriter
from autobuild.rewrite.sites import Site, find_sites
from autobuild.variants import register_variant
from autobuild.variants.base import Option, Variant

__all__ = ["DiracConv2d", "DiracVariant", "dirac_delta", "fold"]

SCOPES = ("network", "convs")
#: Paper v2's initial identity and filter scales.
ALPHA_INIT, BETA_INIT = 1.0, 0.1
_ADDS = {"add", "add_", "iadd"}


def dirac_delta(out_channels: int, in_channels: int, kernel_size: tuple[int, int],
                groups: int = 1) -> Tensor:
    """The kernel δ with ``conv2d(x, δ, groups=groups)`` = x on the first min(C_out, C_in)
    channels of each group (``torch.nn.init.dirac_``)."""
    return nn.init.dirac_(torch.empty(out_channels, in_channels // groups, *kernel_size), groups)


class DiracConv2d(nn.Module):
    """``conv2d(x, diag(α)·δ + diag(β)·W/‖W_o‖) + b``, stride 1, "same" padding (DiracNets v2).

    ``padding`` is derived from kernel and dilation, so that δ is an identity.
    """

    #: α and β are scales, not filters: the paper trains them without weight decay.
    no_weight_decay_params: tuple[str, ...] = ("alpha", "beta")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        kp, dp = _pair(kernel_size), _pair(dilation)
        k, d = (int(kp[0]), int(kp[1])), (int(dp[0]), int(dp[1]))
        if any(v % 2 == 0 for v in k):
            raise AutobuildError(f"a Dirac conv needs an odd kernel (a centre for δ), got {k}")
        if in_channels % groups or out_channels % groups:
            raise AutobuildError(f"channels {in_channels}->{out_channels} are not divisible by "
                                 f"groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.dilation = k, d
        self.padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.alpha = nn.Parameter(torch.full((out_channels,), ALPHA_INIT))
        self.beta = nn.Parameter(torch.full((out_channels,), BETA_INIT))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # δ is a function of the shape: rebuilt, never saved (the state_dict holds only
        # what training changes).
        self.register_buffer("delta", dirac_delta(out_channels, in_channels, k, groups),
                             persistent=False)
        self.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, strided_ok: bool = False) -> DiracConv2d:
        """A (stride-1) Dirac conv with ``conv``'s geometry, or an error saying why δ is not
        an identity. ``strided_ok``: the caller replaces the stride by a pooling."""
        problem = dirac_problem(conv, strided_ok=strided_ok)
        if problem:
            raise AutobuildError(f"cannot Dirac-parametrise this conv: {problem}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation,
                    conv.groups, conv.bias is not None)
        return layer.to(conv.weight.device, conv.weight.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``init=scratch``: a Gaussian W (only its direction matters), α = 1, β = 0.1."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.alpha.fill_(ALPHA_INIT)
        self.beta.fill_(BETA_INIT)
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def preserve(self, weight: Tensor, bias: Tensor | None) -> None:
        """``init=preserve``: compute exactly ``conv2d(x, weight) + bias``: W = weight,
        α = 0, β_o = ‖weight_o‖ (a zero filter stays zero: F.normalize maps it to 0)."""
        self.weight.copy_(weight)
        self.alpha.zero_()
        self.beta.copy_(weight.flatten(1).norm(dim=1))
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def effective_weight(self) -> Tensor:
        """diag(α)·δ + diag(β)·W/‖W_o‖, the kernel the layer convolves with."""
        w = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight)
        shape = (-1, 1, 1, 1)
        return torch.addcmul(self.beta.view(shape) * w, self.alpha.view(shape), self.delta)

    def forward(self, x: Tensor) -> Tensor:
        if fused_ok(None, x, self.weight, self.alpha, self.beta):
            # Training: one Function that keeps x and W, not the rebuilt weight
            # (autobuild.ops.dirac); same convolution, gradients in closed form.
            dev = x.device.type
            dtype = autocast_dtype(dev)
            (x,) = autocast_cast(dtype, x)
            with NoAutocast(dev, dtype is not None):
                return dirac_conv2d(x, self.weight, self.alpha, self.beta, self.bias,
                                    self.padding, self.dilation, self.groups)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            w = self.effective_weight()  # plain autograd (autobuild.ops.plain_ops)
        else:  # inference: build the weight without δ's full pass
            w = dirac_weight(self.weight, self.alpha, self.beta, self.groups)
        return F.conv2d(x, w, self.bias, 1, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def folded(self, bn: nn.modules.batchnorm._BatchNorm | None = None) -> nn.Conv2d:
        """The plain conv this layer (and ``bn``, in eval mode, when given) computes."""
        w = self.effective_weight().double()
        b = self.bias.double() if self.bias is not None else None
        if bn is not None:
            var, mean = bn.running_var.double(), bn.running_mean.double()
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            w = w * scale.view(-1, 1, 1, 1)
            b = (b if b is not None else torch.zeros_like(mean)) - mean
            b = b * scale + (bn.bias.double() if bn.bias is not None else 0.0)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, 1, self.padding,
                         self.dilation, self.groups, bias=b is not None)
        conv = conv.to(self.weight.device, self.weight.dtype)
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


def dirac_problem(conv: nn.Module, *, strided_ok: bool = False) -> str:
    """Why ``conv`` cannot become a Dirac conv ("" when it can)."""
    if type(conv) is not nn.Conv2d:
        return f"it is a {type(conv).__name__}, not an nn.Conv2d"
    k, d, p = conv.kernel_size, conv.dilation, conv.padding
    if any(v % 2 == 0 for v in k):
        return f"its kernel {tuple(k)} is even, so δ has no centre"
    if isinstance(p, str) and p != "same":
        return f"padding={p!r} shrinks the output, so δ is not an identity"
    same = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
    if not isinstance(p, str) and tuple(p) != same:
        return f"padding {tuple(p)} is not 'same' for kernel {tuple(k)}, so δ is not an identity"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is supported)"
    if not strided_ok and max(conv.stride) > 1:
        return f"stride {tuple(conv.stride)} > 1 (a Dirac conv has stride 1)"
    return ""


# ---- network scope: ResNet -> DiracNet ------------------------------------------------------
def _is_add(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_function", "call_method") and name in _ADDS


def _members(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """Module path -> the graph nodes traced inside it (at any depth)."""
    out: dict[str, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            out.setdefault(path, set()).add(node)
    return out


def _inside_ancestors(node: fx.Node, inside: set[fx.Node]) -> int:
    """How many nodes of the block lie on the way from its input to ``node``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in inside:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return len(seen)


def _remove_skip(gm: fx.GraphModule, block: str, inside: set[fx.Node]) -> None:
    """Replace the block's residual ``add(branch, shortcut)`` by ``branch``."""
    outputs = [n for n in inside if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise AutobuildError(f"residual block {block} has {len(outputs)} outputs; scope=network "
                             "needs single-output blocks (use --option scope=convs)")
    add = outputs[0]
    if not _is_add(add) and add.all_input_nodes:  # act(add(...)), as the site finder allows
        add = add.all_input_nodes[0]
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)] if _is_add(add) else []
    if len(operands) != 2:
        raise AutobuildError(f"cannot find the residual addition of block {block}; "
                             "use --option scope=convs")
    a, b = operands
    # The branch is the operand with the longer path through the block (as the site finder
    # decides it); the shortcut, an identity or a projection, is the other one.
    branch = a if _inside_ancestors(a, inside) >= _inside_ancestors(b, inside) else b
    add.replace_all_uses_with(branch)
    gm.graph.erase_node(add)


def _diracnet(rewriter: Rewriter, site: Site, init: str) -> None:
    """Remove every residual block's skip connection and make its convs Dirac convs."""
    if init == "preserve":  # check() refuses it first; this guards direct callers
        raise AutobuildError("dirac scope=network cannot preserve the baseline (skips removed)")
    root = rewriter.root_module
    if not site.input_shape:
        raise AutobuildError("the network's input shape is unknown; pass --input-size C,H,W")
    blocks = [s.name for s in find_sites(root, site.input_shape,
                                         leaf_modules=rewriter.leaf_modules)
              if s.kind == "block"]
    # A block nested in a block (a one-block stage) is the same residual add: keep the inner.
    blocks = [b for b in blocks if not any(o.startswith(b + ".") for o in blocks)]
    if not blocks:
        raise AutobuildError(f"{type(root).__name__} has no residual blocks for scope=network "
                             "to remove (a DiracNet is a ResNet without its skip connections; "
                             "it applies to e.g. cifar_resnet20, resnet18, resnet34); use "
                             "--option scope=convs to Dirac-parametrise single convs")
    params_before = sum(p.numel() for p in root.parameters())
    gm = rewriter.graph()
    members = _members(gm)
    for block in blocks:
        _remove_skip(gm, block, members.get(block, set()))
    gm.graph.eliminate_dead_code()  # the shortcut branches, now unused
    gm.delete_all_unused_submodules()  # ... and their projection convs and BNs

    in_blocks = set().union(*(members.get(b, set()) for b in blocks))
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    convs = [n for n in gm.graph.nodes if n in in_blocks and n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    for node in convs:
        conv = gm.get_submodule(node.target)
        problem = dirac_problem(conv, strided_ok=True)
        if calls[node.target] > 1:
            problem = "it is called more than once (shared weights)"
        if problem:
            raise AutobuildError(f"scope=network cannot turn conv {node.target} into a Dirac "
                                 f"conv: {problem}; use --option scope=convs")
        layer = DiracConv2d.from_conv(conv, strided_ok=True)
        note = ""
        if max(conv.stride) > 1:
            # DiracNet down-samples with max-pooling between groups, never with strides.
            stride = tuple(conv.stride)
            pool_name = f"{node.target}_pool"
            gm.add_submodule(pool_name, nn.MaxPool2d(stride, stride, ceil_mode=True))
            with gm.graph.inserting_before(node):
                pool = gm.graph.call_module(pool_name, (node.args[0],))
            node.args = (pool, *node.args[1:])
            note = f"stride {stride[0]} -> max-pool {stride[0]} + stride 1"
        gm.set_submodule(node.target, layer)
        rewriter.changes.append(Change(_full(rewriter, node.target), rewriter.family,
                                       type(conv).__name__, type(layer).__name__,
                                       _params(conv), _params(layer), note))
    rewriter.recompile()
    rewriter.changes.append(Change(rewriter.root or "network", rewriter.family,
                                   type(root).__name__, "DiracNet", params_before,
                                   sum(p.numel() for p in gm.parameters()),
                                   f"{len(blocks)} skip connections removed"))


def _full(rewriter: Rewriter, local: str) -> str:
    return f"{rewriter.root}.{local}" if rewriter.root else local


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- folding --------------------------------------------------------------------------------
@torch.no_grad()
def _fold_in_place(root: nn.Module, leaf_modules: Iterable[Any] = ()) -> list[Change]:
    """Swap every Dirac conv of ``root`` for the plain conv it computes, folding in the BN
    that is its only user (its module then becomes ``nn.Identity``)."""
    from autobuild.rewrite.trace import trace

    gm = trace(root, leaf_modules=leaf_modules)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    changes: list[Change] = []
    for node in list(gm.graph.nodes):
        # root, not gm: a shared Dirac conv's second call finds it already folded.
        if node.op != "call_module" or not isinstance(root.get_submodule(node.target),
                                                      DiracConv2d):
            continue
        dirac: DiracConv2d = root.get_submodule(node.target)
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
        changes.append(Change(str(node.target), "dirac", "DiracConv2d", "Conv2d",
                              _params(dirac) + (_params(bn) if bn is not None else 0),
                              _params(conv), f"folded with {bn_name}" if bn_name else "folded"))
    return changes


def _plan_root(plan: Plan) -> str:
    if plan.model.startswith("custom:"):
        return ""
    from autobuild.models import get_model_entry

    return get_model_entry(plan.model).trace_root


def fold(model: nn.Module) -> nn.Module:
    """A new model in which each Dirac conv and the BN that follows it are one ``nn.Conv2d``
    (BN in eval mode, i.e. its running statistics): the plain ReLU → conv chain of the
    released DiracNets, equal to ``model`` in eval mode to float precision. Its plan is
    ``model``'s with ``folded=true``, so it saves and loads as plan + weights."""
    from autobuild.rewrite.apply import plan_of

    plan = plan_of(model)
    new = copy.deepcopy(model)
    root_name = _plan_root(plan) if plan is not None else ""
    root = new.get_submodule(root_name) if root_name else new
    changes = _fold_in_place(root, plan.leaf_modules if plan is not None else ())
    if not changes:
        raise AutobuildError("the model has no Dirac convs to fold; convert it with --to dirac "
                             "first (a folded model is already plain)")
    if plan is not None:
        folded_plan = copy.deepcopy(plan)
        for conversion in folded_plan.conversions:
            if conversion.family == DiracVariant.name:
                conversion.options = {**conversion.options, "folded": True}
        new._autobuild_plan = folded_plan
    return new


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
    inits = ("scratch", "preserve")
    leaf_modules = (DiracConv2d,)
    example_models = ("cifar_resnet20", "resnet18", "resnet34", "cifar_vgg16")

    def contract_cases(self) -> list[tuple[str, dict[str, Any], list[str] | None]]:
        model = self.example_models[0]
        return [(model, {"scope": scope, "folded": folded}, None)
                for scope in SCOPES for folded in (False, True)]

    def accepts(self, site: Site, options: dict[str, Any]) -> bool:
        if options["scope"] == "network":
            return site.kind == "network"
        # A shared conv (call >= 0) keeps its weights shared: swapping one call would split it.
        return (site.kind == "conv" and site.module_type == "Conv2d" and site.stride == 1
                and site.call < 0 and all(k % 2 == 1 for k in site.kernel_size)
                and site.input_shape[1:] == site.output_shape[1:])

    def default_sites(self, candidates: Sequence[Site], options: dict[str, Any]) -> list[Site]:
        """scope=convs: every candidate but the stem (DiracNet's stem is a plain conv; an
        identity from 3 image channels means nothing)."""
        return [s for s in candidates if not s.extra.get("stem")]

    def check(self, sites: Sequence[Site], options: dict[str, Any], init: str) -> None:
        super().check(sites, options, init)
        if init == "preserve" and options["scope"] == "network":
            raise AutobuildError("dirac scope=network removes the skip connections, which "
                                 "changes the function, so --init preserve is impossible; use "
                                 "--init scratch, or --option scope=convs --init preserve")

    def apply(self, rewriter: Rewriter, sites: Sequence[Site], options: dict[str, Any],
              init: str) -> None:
        if options["scope"] == "network":
            _diracnet(rewriter, sites[0], init)
        else:
            for site in sites:
                rewriter.replace(site, self.build(site, rewriter.module(site), options, init))
        if options["folded"]:
            changes = _fold_in_place(rewriter.root_module, rewriter.leaf_modules)
            for c in changes:
                c.site = _full(rewriter, c.site)
            rewriter.changes.extend(changes)

    def build(self, site: Site, module: nn.Module, options: dict[str, Any],
              init: str) -> nn.Module:
        if not isinstance(module, nn.Conv2d):
            raise AutobuildError(f"site {site.name} is a {type(module).__name__}; dirac "
                                 "scope=convs converts nn.Conv2d sites")
        layer = DiracConv2d.from_conv(module)
        if init == "preserve":
            layer.preserve(module.weight, module.bias)
        return layer


register_variant(DiracVariant)
