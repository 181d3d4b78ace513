"""QLNet's continuous symmetry (see ``autobuild.variants.multiplicative``): with BN folded
into the convs, a stage's residual stream can be rotated by any orthogonal Q without
changing the output. :func:`symmetry_transform` applies it, :func:`check_symmetry`
measures it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from autobuild.errors import AutobuildError
from autobuild.rewrite import plan_of, root_of
from autobuild.variants._ql_layers import Hardball, QLBlock, SharedDepthwiseConv2d, Softball

__all__ = ["check_symmetry", "symmetry_transform"]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode BN as one conv with a bias (always with a bias: the
    rotation writes it)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval())


@torch.no_grad()
def _fold_block(block: QLBlock) -> None:
    if isinstance(block.conv2, SharedDepthwiseConv2d):  # BN2 gives each channel its own kernel
        block.conv2 = block.conv2.to_conv()
    block.conv1, block.bn1 = _fold(block.conv1, block.bn1), nn.Identity()
    block.conv2, block.bn2 = _fold(block.conv2, block.bn2), nn.Identity()
    block.conv3, block.bn3 = _fold(block.conv3, block.bn3), nn.Identity()
    if block.has_skip_conv:
        block.skip = nn.Sequential(_fold(block.skip[0], block.skip[1]), nn.Identity())


#: Ops a rotation of the channels passes through unchanged (they act per channel, or on
#: the per-pixel norm, or only reshape when the spatial size is 1).
_EQUIVARIANT_MODULES = (Hardball, Softball, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d,
                        nn.AvgPool2d)
_EQUIVARIANT_CALLS = {torch.flatten, "flatten", "view", "reshape", "contiguous"}
_HARMLESS_CALLS = {"size", "dim"}


@dataclass
class _Stream:
    """One stage's residual stream: who writes it and who reads it."""

    start: str
    channels: int
    writers: list[nn.Conv2d] = field(default_factory=list)
    readers: list[nn.Module] = field(default_factory=list)


def _stream(gm: fx.GraphModule, start: fx.Node) -> _Stream | None:
    """Follow the stream a skip-conv QL block opens to everything that reads it; None when
    something that does not commute with a rotation (a ReLU, the network output) reads it."""
    block: QLBlock = gm.get_submodule(start.target)
    s = _Stream(str(start.target), block.outplanes, [block.skip[0], block.conv3])
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            target = user.target
            if user.op == "call_module":
                m = gm.get_submodule(target)
                if isinstance(m, QLBlock) and not m.has_skip_conv:  # same stream, continues
                    s.readers.append(m.conv1)
                    s.writers.append(m.conv3)
                    todo.append(user)
                elif isinstance(m, QLBlock):  # opens the next stream: reads this one
                    s.readers += [m.conv1, m.skip[0]]
                elif isinstance(m, _EQUIVARIANT_MODULES):
                    todo.append(user)
                elif isinstance(m, nn.Linear) and m.in_features == s.channels:
                    s.readers.append(m)
                elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == s.channels:
                    s.readers.append(m)
                else:
                    return None
            elif user.op in ("call_function", "call_method") and target in _EQUIVARIANT_CALLS:
                todo.append(user)
            elif user.op in ("call_function", "call_method") and target in _HARMLESS_CALLS:
                continue
            else:
                return None
    return s


def _orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@torch.no_grad()
def _rotate(weight: Tensor, q: Tensor, *, side: str) -> Tensor:
    w = weight.double()
    out = (torch.einsum("oi,i...->o...", q, w) if side == "out"      # writer: Q·W
           else torch.einsum("oi...,ji->oj...", w, q))              # reader: W·Qᵀ
    return out.to(weight.dtype)


def _streams(model: nn.Module, leaf_modules: Sequence[Any]) -> tuple[list[_Stream], int]:
    from autobuild.rewrite.trace import trace

    gm = trace(model, leaf_modules=leaf_modules)
    starts, n_blocks = [], 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QLBlock):
            n_blocks += 1
            if gm.get_submodule(node.target).has_skip_conv:
                starts.append(node)
    streams = [s for s in (_stream(gm, n) for n in starts) if s is not None]
    return streams, n_blocks


def symmetry_transform(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """A new model computing the same function (eval mode): BN folded into the QL blocks'
    convs, then each stage's residual stream rotated by a random orthogonal Q (seeded).

    Stages whose stream reaches something that does not commute with a rotation (the
    stream after the ResNet stem's ReLU, a non-QL block, the output itself) keep Q = I.
    The result has folded convs, so it no longer matches its plan's state_dict.
    """
    return _symmetry(model, seed)[0]


@torch.no_grad()
def _symmetry(model: nn.Module, seed: int) -> tuple[nn.Module, int]:
    new = copy.deepcopy(model).eval()
    plan = plan_of(model)
    root = root_of(new)
    blocks = [m for m in root.modules() if isinstance(m, QLBlock)]
    if not blocks:
        raise AutobuildError("the model has no QL blocks: convert it with --to multiplicative "
                             "before checking the QLNet symmetry")
    for b in blocks:
        _fold_block(b)
    streams, _ = _streams(root, list(plan.leaf_modules) if plan is not None else [])
    generator = torch.Generator().manual_seed(seed)
    for s in streams:
        q = _orthogonal(s.channels, generator)
        for conv in s.writers:
            conv.weight.copy_(_rotate(conv.weight, q, side="out"))
            conv.bias.copy_(_rotate(conv.bias, q, side="out"))
        for m in s.readers:
            m.weight.copy_(_rotate(m.weight, q, side="in"))
    return new, len(streams)


@torch.no_grad()
def check_symmetry(model: nn.Module, *, seed: int = 0,
                   input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Compare the logits of ``model`` and :func:`symmetry_transform` (model) in eval mode on
    one random input; ``relative`` = max |difference| / max |output|."""
    if input_size is None:
        plan = plan_of(model)
        if plan is None or plan.input_size is None:
            raise AutobuildError("check_symmetry needs input_size for a model without a plan")
        input_size = plan.input_size
    from autobuild.summary import output_difference

    rotated, stages = _symmetry(model, seed)
    if not stages:  # else only BN folding is compared: a pass that tested nothing
        raise AutobuildError("no stage's residual stream can be rotated: each reaches "
                             "something that does not commute with a rotation (a block that "
                             "is not a QL block, the stem's ReLU, the output), so there is "
                             "nothing to check; convert every block of a stage to "
                             "multiplicative")
    diff, scale = output_difference(model, rotated, input_size, seed=seed)
    return {"max_abs_diff": diff, "max_abs_output": scale, "relative": diff / max(scale, 1e-12),
            "stages": stages, "seed": seed}
