"""QLNet presets (Yao Liu, arXiv 2308.01621): whole QLNets as baselines, built from the
multiplicative family's layers (``autobuild.variants.multiplicative``).

``qlnet10m``: the paper's qlnet-10m, stages [3, 4, 6, 3] (10,064,296 params, 2.418 GMACs at
224x224; paper 10.06M / 2.42G). The same network as ``resnet50 --to multiplicative --option
layout=qlnet``.
``qlnet26``: stages [2, 2, 2, 2] -- 26 weight layers (stem, 8 blocks of 3 convs, classifier),
the layout of timm's ``resnet26``, which the QLNet author's first code
(liuyao12/ConvNets-PDE-perspective, commit 6b556b1) builds from QL blocks.

Options of the family (``ball``, ``dw_kernels``, ``hardball``) apply through the builder's
keyword arguments in Python; the CLI reaches them with ``resnet50 --to multiplicative
--option layout=qlnet,...``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autobuild.models.registry import register_model

__all__ = ["QLNET_PRESETS"]

#: name -> blocks per stage.
QLNET_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "qlnet10m": (3, 4, 6, 3),
    "qlnet26": (2, 2, 2, 2),
}


def _builder(layers: tuple[int, int, int, int]):
    def build(num_classes: int = 1000, **kw: Any) -> nn.Module:
        # The family module registers QLBlock & co. as fx leaves, which tracing needs.
        from autobuild.variants.multiplicative import QLNet

        return QLNet(layers, num_classes, **kw)
    return build


for _name, _layers in QLNET_PRESETS.items():
    register_model(_name, _builder(_layers), source="qlnet",
                   description=f"QLNet with {list(_layers)} QL blocks per stage (arXiv "
                               "2308.01621)")
