"""Vision-transformer baselines built from timm's classes (timm is optional: the builders
import it when called).

``pflayer_vit_{ti,s,b}``: the ViT trunks of PfLayer (naver-ai/PfLayer ``vit_pf.py``,
``EffTransformer``): timm's VisionTransformer without a class token, the final LayerNorm
before global average pooling of the tokens (``class_token=False, global_pool='avg',
fc_norm=False``), patch 16 at 224x224. ``autobuild convert pflayer_vit_s --to
parameter-free`` is PfLayer's ViT-S-max, parameter for parameter (its odd blocks' attentions
become Linear-GELU-max-pool-GELU-Linear); ``timm:vit_small_patch16_224`` converts the same
way with its class token kept out of the pool.

``vit_micro_cifar``: a 2-block ViT (dim 48, patch 8) at 32x32 for tests and quick trials.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autobuild.errors import AutobuildError
from autobuild.models.registry import register_model

__all__ = ["PFLAYER_VITS"]

#: PfLayer's ViT sizes: (embed_dim, num_heads), depth 12, MLP ratio 4.
PFLAYER_VITS = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}


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
register_model("vit_micro_cifar", _vit_micro, input_size=(3, 32, 32), num_classes=10,
               source="timm", description="a 2-block ViT (dim 48, patch 8) for 32x32 tests")
