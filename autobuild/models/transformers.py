"""Vision-transformer baselines built from timm's classes (timm is optional: the builders
import it when called).

``pflayer_vit_{ti,s,b}``: the ViT trunks of PfLayer (naver-ai/PfLayer ``vit_pf.py``,
``EffTransformer``): timm's VisionTransformer without a class token, the final LayerNorm
before global average pooling of the tokens (``class_token=False, global_pool='avg',
fc_norm=False``), patch 16 at 224x224. ``autobuild convert pflayer_vit_s --to
parameter-free`` is PfLayer's ViT-S-max, parameter for parameter (its odd blocks' attentions
become Linear-GELU-max-pool-GELU-Linear); ``timm:vit_small_patch16_224`` converts the same
way with its class token kept out of the pool.

``pflayer_pit_{ti,s,b}``: the PiT trunks of PfLayer (``pit_pf.py``, ``PoolingTransformer``):
a conv patch embedding, three stages of transformer blocks on the token grid with a
depthwise stride-2 conv between them, no class token, LayerNorm then average pooling.
``--to parameter-free`` gives PfLayer's PiT-*-max; timm's ``pit_s_224`` differs by its
class token and the Linear that maps it at each pooling.

``vit_micro_cifar``: a 2-block ViT (dim 48, patch 8) at 32x32 for tests and quick trials.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.models.registry import register_model

__all__ = ["PFLAYER_PITS", "PFLAYER_VITS", "PfPiT"]

#: PfLayer's ViT sizes: (embed_dim, num_heads), depth 12, MLP ratio 4.
PFLAYER_VITS = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}
#: PfLayer's PiT sizes: (patch, stride, head dim, blocks per stage, heads per stage).
PFLAYER_PITS = {"ti": (16, 8, 32, (2, 6, 4), (2, 4, 8)),
                "s": (16, 8, 48, (2, 6, 4), (3, 6, 12)),
                "b": (14, 7, 64, (3, 6, 4), (4, 8, 16))}


def _timm_block():
    try:
        from timm.models.vision_transformer import Block
    except ImportError as exc:
        raise AutobuildError("the ViT baselines need timm: pip install 'autobuild[timm]'"
                             ) from exc
    return Block


class _GridStage(nn.Module):
    """Transformer blocks run on the (B, C, H, W) grid flattened to tokens and back."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        block = _timm_block()
        self.blocks = nn.Sequential(*[
            block(dim, heads, mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = self.blocks(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, c, h, w)


class PfPiT(nn.Module):
    """PfLayer's PiT trunk (``pit_pf.PoolingTransformer`` without its optional parts): the
    same modules and parameter shapes, at the fixed input size it was built for."""

    def __init__(self, patch: int, stride: int, head_dim: int, depths: tuple[int, ...],
                 heads: tuple[int, ...], num_classes: int = 1000, img_size: int = 224,
                 in_chans: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        dims = [head_dim * h for h in heads]
        side = (img_size - patch) // stride + 1
        self.patch_embed = nn.Conv2d(in_chans, dims[0], patch, stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], side, side))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.transformers = nn.ModuleList(
            _GridStage(d, n, h, mlp_ratio) for d, n, h in zip(dims, depths, heads, strict=True))
        # The stride-2 depthwise-style pooling conv between stages (pit_pf.conv_head_pooling).
        self.pools = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1, groups=a)
                                   for a, b in zip(dims, dims[1:], strict=False))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for stage, pool in zip(self.transformers, self.pools, strict=False):
            x = pool(stage(x))
        x = self.transformers[-1](x)
        x = self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)
        return self.head(x)


def _vit(num_classes: int, **kw: Any) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise AutobuildError("the ViT baselines need timm: pip install 'autobuild[timm]'"
                             ) from exc
    return VisionTransformer(num_classes=num_classes, **kw)


def _pflayer_vit(dim: int, heads: int):
    def builder(num_classes: int = 1000) -> nn.Module:
        return _vit(num_classes, img_size=224, patch_size=16, embed_dim=dim, depth=12,
                    num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=False,
                    global_pool="avg", fc_norm=False)
    return builder


def _vit_micro(num_classes: int = 10) -> nn.Module:
    return _vit(num_classes, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                mlp_ratio=2.0)


for _size, (_dim, _heads) in PFLAYER_VITS.items():
    register_model(f"pflayer_vit_{_size}", _pflayer_vit(_dim, _heads), source="timm",
                   description=f"PfLayer's ViT-{_size.upper()} trunk (no class token, average "
                               "pooled); --to parameter-free gives its -max model")
for _size, (_p, _s, _d, _depths, _heads) in PFLAYER_PITS.items():
    register_model(f"pflayer_pit_{_size}",
                   lambda num_classes=1000, _a=(_p, _s, _d, _depths, _heads): PfPiT(
                       *_a, num_classes=num_classes), source="timm",
                   description=f"PfLayer's PiT-{_size.upper()} trunk (no class token); "
                               "--to parameter-free gives its -max model")
register_model("vit_micro_cifar", _vit_micro, input_size=(3, 32, 32), num_classes=10,
               source="timm", description="a 2-block ViT (dim 48, patch 8) for 32x32 tests")
