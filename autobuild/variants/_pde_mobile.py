"""The official ImageNet Global networks of the pde-global family: MobileNetV2-, EfficientNet-B0-
and MobileNetV3-Large-Global (``imagenet_global_models.py`` of anilkagak2/PDE_GlobalLayer),
built on timm's own EfficientNet and MobileNetV3 classes as the official code is.

The official networks are timm networks whose ``arch_def`` strings have fewer blocks per
stage, and in most stages a ``gr`` block: a ``GlobalFeatureBlock_Diffusion`` with
``cell_type='InvertedResidualCell'``, i.e. H^0 = an inverted residual of the block's ``ir``
arguments (k, s, e, c, se, n), followed by the PDE. The ``gr``-only arguments, as the
official builder decodes them: ``j`` = K steps, ``xy`` = constant diffusivity cDx, cDy
(default 1), ``udot`` = the isotropic velocity field (``use_dot``), ``dx``/``dy``/``dt``.
Two of them change nothing in the official code, and so change nothing here: ``rs`` sets a
key (``residual``) the block never reads (it reads ``use_res``), and ``ucds`` (``use_cDs``)
only shapes learned diffusivities, which ``xy`` switches off. The coefficient batch norms
use eps 1e-5 (the builder sets ``use_diff_eps=False``) and the activation is the block's.
timm is imported only when a network is built (it is an optional dependency).
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.variants._pde_layers import GlobalLayer

__all__ = ["MOBILE_ARCHS", "MOBILE_BASELINES", "MOBILE_NAMES", "InvertedResidualGlobal",
           "baseline_settings", "build_mobile_global", "mobile_refusal", "split_gr",
           "timm_architecture"]

#: The official arch_def of each Global network, verbatim, by the timm architecture it
#: condenses (the official ``global_*`` models; the ``new_*`` ones are timm's baselines).
MOBILE_ARCHS: dict[str, list[list[str]]] = {
    "mobilenetv2_100": [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k3_s2_e6_c24", "gr_r1_k3_s1_e6_c24_nre_j1_rs1_xy1"],
        ["ir_r1_k3_s2_e6_c32", "gr_r1_k3_s1_e6_c32_nre_j1_rs1_xy1"],
        ["ir_r1_k3_s2_e6_c64", "gr_r1_k3_s1_e6_c64_nre_j1_rs1_xy1"],
        ["ir_r1_k3_s1_e6_c96", "gr_r1_k3_s1_e6_c96_j1_rs1_xy1"],
        ["ir_r1_k3_s2_e6_c160", "gr_r1_k3_s1_e6_c160_j1_rs1_xy1"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
    "efficientnet_b0": [
        ["ds_r1_k3_s1_e1_c16_se0.25"],
        ["ir_r1_k3_s2_e6_c24_se0.25",
         "gr_r1_k3_s1_e6_c24_se0.25_j1_xy1_rs1_udot1_dx1_dy1_dt0.1_cDx2._cDy2."],
        ["ir_r1_k5_s2_e6_c40_se0.25",
         "gr_r1_k5_s1_e6_c40_se0.25_j1_xy1_rs1_udot1_dx2_dy2_dt0.1_cDx2._cDy2."],
        ["ir_r1_k3_s2_e6_c80_se0.25", "gr_r1_k3_s1_e6_c80_se0.25_j1_xy1_rs1_udot1_ucds1"],
        ["ir_r1_k5_s1_e6_c112_se0.25", "gr_r1_k5_s1_e6_c112_se0.25_j1_xy1_rs1_udot1_ucds1"],
        ["ir_r1_k5_s2_e6_c192_se0.25", "gr_r1_k5_s1_e6_c192_se0.25_j1_xy1_rs1_udot1"],
        ["ir_r1_k3_s1_e6_c320_se0.25"],
    ],
    "mobilenetv3_large_100": [
        ["ds_r1_k3_s1_e1_c16_nre"],
        ["ir_r1_k3_s2_e4_c24_nre", "gr_r1_k3_s1_e3_c24_nre_j1_xy1_rs1"],
        ["ir_r1_k5_s2_e3_c40_se0.25_nre",
         "gr_r1_k5_s1_e3_c40_se0.25_nre_j1_rs1_xy1_udot1_dx1_dy1_dt0.2_cDx1._cDy1._ucds1"],
        ["ir_r1_k3_s2_e6_c80", "gr_r1_k3_s1_e6_c80_j1_xy1_udot1_ucds1_rs1"],
        ["ir_r1_k3_s1_e6_c112_se0.25", "gr_r1_k3_s1_e6_c112_se0.25_j1_xy1_rs1_udot1"],
        ["gr_r1_k5_s2_e6_c160_se0.25_j1_xy1_rs1_udot1"],
        ["cn_r1_k1_s1_c960"],
    ],
}
#: The official names of the networks (the paper's).
MOBILE_NAMES = {"mobilenetv2_100": "MobileNetV2-Global",
                "efficientnet_b0": "EfficientNet-B0-Global",
                "mobilenetv3_large_100": "MobileNetV3-Large-Global"}
#: The baselines layout=paper condenses, as the CLI names them (for messages).
MOBILE_BASELINES = ", ".join(f"timm:{a}" for a in MOBILE_ARCHS)
#: The arguments only a ``gr`` string has, as the official ``_decode_block_str`` keys them.
_GR_KEYS = ("j", "xy", "rs", "udot", "ucds", "dx", "dy", "dt", "cDx", "cDy")
#: The activation codes of block strings (``nre``, ...) -> the Global layer's ``act``.
_ACT_CODES = {"re": "relu", "r6": "relu6", "hs": "hardswish", "sw": "silu"}
#: Each network's default activation (the official generators' ``resolve_act_layer``).
_NETWORK_ACT = {"mobilenetv2_100": "relu6", "efficientnet_b0": "silu",
                "mobilenetv3_large_100": "hardswish"}
#: The Global layer's activation names -> timm's (``get_act_layer``).
_TIMM_ACT = {"relu6": "relu6", "silu": "swish", "hardswish": "hard_swish"}
#: The keys of a timm ``pretrained_cfg`` that name weights: the Global network has none.
_WEIGHT_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "tag", "source")


def split_gr(block: str) -> tuple[str, dict[str, Any]]:
    """A ``gr`` block string -> the ``ir`` string of its inverted residual and the Global
    layer's keyword arguments (the official decoding: a key is the leading letters, the
    value the rest: ``cDx2.`` -> cDx = 2.0); ``act`` is None where the string names none
    (the network's default applies)."""
    kind, *ops = block.split("_")
    if kind != "gr":
        raise AutobuildError(f"not a Global block string: {block!r}")
    kept, gr = ["ir"], {}
    for op in ops:
        key, value = (re.split(r"(\d.*)", op) + [""])[:2]
        if key in _GR_KEYS:
            gr[key] = value
        else:
            kept.append(op)
    if "xy" not in gr:  # no official network learns its diffusivity in a gr block
        raise AutobuildError(f"{block!r}: only constant-diffusivity (xy) Global blocks exist")
    act = next((_ACT_CODES[op[1:]] for op in ops if op[1:] in _ACT_CODES and op[0] == "n"),
               None)
    kernel = next(op[1:] for op in ops if re.fullmatch(r"k\d+", op))
    settings = {"steps": int(gr.get("j", 3)), "dt": float(gr.get("dt", 0.2)),
                "dx": int(gr.get("dx", 1)), "dy": int(gr.get("dy", 1)),
                "cdx": float(gr.get("cDx", 1.0)), "cdy": float(gr.get("cDy", 1.0)),
                "velocity": "isotropic" if "udot" in gr else "dwconv",
                "kernel_size": int(kernel), "act": act}
    return "_".join(kept), settings


class InvertedResidualGlobal(GlobalLayer):
    """The official ``GlobalFeatureBlock_Diffusion`` with ``cell_type='InvertedResidualCell'``:
    H^0 = ``init_block``(x) (a timm InvertedResidual); f = H^-1 = x, or H^0 where the block
    changes the resolution or the channels (the official ``f = h``); the PDE with a constant
    diffusivity, then act(BN(H^K)). Masked, the block is its inverted residual."""

    def __init__(self, init_block: nn.Module, channels: int, reshapes: bool,
                 **options: Any) -> None:
        super().__init__(channels, diffusivity="constant", bn_eps="1e-5", **options)
        self.init_block = init_block
        self.init_kind = "invertedresidual"
        self.reshapes = reshapes

    def forward(self, x: Tensor) -> Tensor:
        h = self.init_block(x)
        if self.masked:
            return h
        return self.solve(h if self.reshapes else x, h)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, cdx={self.cdx}, cdy={self.cdy}, "
                f"kernel_size={self.kernel_size}, reshapes={self.reshapes}")


def timm_architecture(root: nn.Module) -> str:
    """The timm architecture a timm model was created as ('' if it was not)."""
    cfg = getattr(root, "pretrained_cfg", None)
    return str(cfg.get("architecture", "")) if isinstance(cfg, dict) else ""


def baseline_settings(root: nn.Module) -> dict[str, Any]:
    """What the official network takes over from the baseline ``root``, a timm model: its
    classes, input channels and the two training-time rates (drop_rate before the
    classifier; drop_path_rate, which timm spreads over the blocks as rate·i/n and which
    is read back from one of them)."""
    from timm.layers import DropPath

    blocks = [b for stage in root.blocks for b in stage]
    rate = next((b.drop_path.drop_prob * len(blocks) / i for i, b in enumerate(blocks)
                 if isinstance(getattr(b, "drop_path", None), DropPath) and i), 0.0)
    return {"num_classes": root.num_classes, "in_chans": root.conv_stem.in_channels,
            "drop_rate": float(getattr(root, "drop_rate", 0.0)), "drop_path_rate": rate}


@lru_cache(maxsize=16)
def _default_repr(arch: str, num_classes: int, in_chans: int, drop_rate: float,
                  drop_path_rate: float) -> str:
    import timm

    with torch.device("meta"):  # the structure only
        return repr(timm.create_model(arch, num_classes=num_classes, in_chans=in_chans,
                                      drop_rate=drop_rate, drop_path_rate=drop_path_rate))


def mobile_refusal(root: nn.Module) -> str:
    """Why layout=paper cannot condense ``root`` ('' if it can): the official networks are
    built from timm's default arguments of one of the three architectures, so a baseline
    created with others (an activation, a BN eps, ...) is refused, not silently changed."""
    arch = timm_architecture(root)
    if arch not in MOBILE_ARCHS:
        made = f"timm:{arch}" if arch else "not made by timm.create_model"
        return (f"layout=paper builds the official ImageNet Global networks of "
                f"{MOBILE_BASELINES} "
                f"only, not of this {type(root).__name__} ({made})")
    default, given = _default_repr(arch, **baseline_settings(root)), repr(root)
    if given != default:
        # The first line the baseline has and the default lacks (else the other way).
        lines = list(difflib.ndiff(default.splitlines(), given.splitlines()))
        added = [ln[2:] for ln in lines if ln.startswith("+ ")]
        diff = (added or [ln[2:] for ln in lines if ln.startswith("- ")])[0].strip()
        return (f"layout=paper builds the official {MOBILE_NAMES[arch]} from timm's default "
                f"arguments of timm:{arch}; this one was created with others ({diff!r}); "
                f"create it with timm's defaults")
    return ""


def build_mobile_global(arch: str, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                        drop_path_rate: float = 0.0) -> nn.Module:
    """The official Global network of timm's ``arch`` (a key of :data:`MOBILE_ARCHS`);
    ``drop_path_rate`` reaches the inverted residuals as in the official builder (the
    Global part has none: the official block drops paths only with ``use_res``)."""
    try:
        from timm.models._efficientnet_blocks import SqueezeExcite
        from timm.models._efficientnet_builder import (
            decode_arch_def,
            efficientnet_init_weights,
            resolve_act_layer,
            round_channels,
        )
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3
    except ImportError as exc:  # pragma: no cover - the baseline itself needs timm
        raise AutobuildError("the ImageNet Global networks need timm: pip install "
                             "'autobuild[timm]'") from exc
    arch_def = MOBILE_ARCHS[arch]
    strings = [[split_gr(b)[0] if b.startswith("gr") else b for b in stage]
               for stage in arch_def]
    # The official generators' arguments (timm's, for these three networks).
    common: dict[str, Any] = dict(
        block_args=decode_arch_def(strings), num_classes=num_classes, in_chans=in_chans,
        num_features=1280, round_chs_fn=partial(round_channels, multiplier=1.0),
        norm_layer=nn.BatchNorm2d, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
        act_layer=resolve_act_layer({}, _TIMM_ACT[_NETWORK_ACT[arch]]))
    if arch == "mobilenetv3_large_100":
        se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                     rd_round_fn=round_channels)
        net: nn.Module = MobileNetV3(stem_size=16, fix_stem=False, se_layer=se, **common)
    else:
        net = EfficientNet(stem_size=32, fix_stem=False, **common)
    for s, stage in enumerate(arch_def):
        for b, block in enumerate(stage):  # every official string has r1: one block each
            if not block.startswith("gr"):
                continue
            settings = split_gr(block)[1]
            settings["act"] = settings["act"] or _NETWORK_ACT[arch]
            ir = net.blocks[s][b]
            out = ir.conv_pwl.out_channels
            reshapes = ir.conv_dw.stride != (1, 1) or ir.conv_pw.in_channels != out
            layer = InvertedResidualGlobal(ir, out, reshapes, **settings)
            efficientnet_init_weights(layer)  # the official network inits every module
            net.blocks[s][b] = layer
    return net


def data_config(root: nn.Module, arch: str) -> dict[str, Any]:
    """The baseline's timm ``pretrained_cfg`` without its weights (so that timm's
    ``resolve_data_config`` gives the Global network the same mean, std and crop), named
    as the official model."""
    cfg = getattr(root, "pretrained_cfg", None) or {}
    return {**{k: v for k, v in cfg.items() if k not in _WEIGHT_KEYS},
            "architecture": f"global_{arch}"}
