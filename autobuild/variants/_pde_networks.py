"""The pde-global family's networks: the official CIFAR ResNet-Global, the Global layer of
DARTS-Global whose H^0 is a DARTS cell, and the network each baseline becomes under
layout=paper (see ``autobuild.variants.pde_global``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.variants._pde_layers import PAPER_WIDTHS, GlobalLayer, basic_block, parse_widths
from autobuild.variants._pde_mobile import (
    MOBILE_NAMES,
    baseline_settings,
    build_mobile_global,
    data_config,
    timm_architecture,
)

__all__ = ["DARTS", "DENSENET", "MOBILE", "CellGlobalLayer", "ResNetGlobal", "paper_network"]

#: The DenseNet-BC and DARTS baselines (``autobuild.models``) that layout=paper turns into
#: the official DenseNet- and DARTS-Global; named, not imported: families sit below the zoo.
DENSENET, DARTS = "CifarDenseNet", "DartsNetwork"
#: timm's classes of the ImageNet baselines that layout=paper condenses (by architecture).
MOBILE = ("EfficientNet", "MobileNetV3")


class CellGlobalLayer(GlobalLayer):
    """The official ``GlobalFeatureBlock_Diffusion`` with ``cell_type='DartCell'``: on the two
    previous states (s0, s1) of a DARTS network, H^0 = ``cell``(s0, s1), f = H^-1 = s1 (the
    cell keeps s1's channels); the options are GlobalLayer's (``init_block`` is the cell)."""

    def __init__(self, cell: nn.Module, channels: int, **options: object) -> None:
        super().__init__(channels, **options)  # type: ignore[arg-type]
        self.init_block = cell
        self.init_kind = "dartcell"

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:  # type: ignore[override]
        if self.masked:  # the identity: the network goes on from s1
            return s1
        return self.solve(s1, self.init_block(s0, s1))


class ResNetGlobal(nn.Module):
    """The official CIFAR ResNet-Global (``model.pdenet`` / ``pdenet_original``): a 3x3 stem,
    three or four stages of ``blocks`` basic blocks (``widths`` channels; strides 1, 2, 2,
    2) with a Global layer after stages 1-3, average pooling and a Linear head
    (``layer_options``: GlobalLayer's). Three widths give the official three-stage network
    (``-o``, and ``wideresnet.wide_resnet`` with widths × its ``-wdt``)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 widths: Sequence[int] = PAPER_WIDTHS, blocks: int = 1, steps: int = 1,
                 dt: float = 0.2, coeffs: str = "dwconv", separable: bool = False,
                 **layer_options: object) -> None:
        super().__init__()
        if len(widths) not in (3, 4):
            raise AutobuildError(f"ResNet-Global has 3 or 4 stages (got widths={widths})")
        w1 = widths[0]
        self.conv1 = nn.Conv2d(in_chans, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        opts = dict(steps=steps, dt=dt, coeffs=coeffs, separable=separable, **layer_options)
        self.layer1 = _stage(w1, w1, blocks, 1, separable)
        self.global1 = GlobalLayer(w1, **opts)  # type: ignore[arg-type]
        self.layer2 = _stage(w1, widths[1], blocks, 2, separable)
        self.global2 = GlobalLayer(widths[1], **opts)  # type: ignore[arg-type]
        self.layer3 = _stage(widths[1], widths[2], blocks, 2, separable)
        self.global3 = GlobalLayer(widths[2], **opts)  # type: ignore[arg-type]
        # The official layer4 is strided as well; the three-stage network has none.
        self.layer4 = (_stage(widths[2], widths[3], blocks, 2, separable) if len(widths) == 4
                       else nn.Identity())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():  # the official init: N(0, 2/(k·k·out)) convs, unit BNs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.global1(self.layer1(x))
        x = self.global2(self.layer2(x))
        x = self.global3(self.layer3(x))
        x = self.layer4(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(inplanes: int, planes: int, blocks: int, stride: int,
           separable: bool = False) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes))
    layers = [basic_block(inplanes, planes, stride, downsample, separable)]
    layers += [basic_block(planes, planes, separable=separable) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def paper_network(kind: str, root: nn.Module, options: dict[str, Any],
                  kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    """The official network layout=paper builds from the baseline ``root``, and a note."""
    if kind in MOBILE:
        arch = timm_architecture(root)
        net = build_mobile_global(arch, **baseline_settings(root))
        net.pretrained_cfg = data_config(root, arch)  # timm.data.resolve_data_config reads it
        return net, f"official {MOBILE_NAMES[arch]}"
    if kind == DENSENET:
        # The baseline's own class with fewer layers and a Global layer after each
        # transition (the official densenet.DenseNet with global_ft).
        n = options["dense_layers"]
        net = type(root)(root.growth, (n,) * len(root.block_config),
                         root.classifier.out_features, root.features.conv0.in_channels,
                         root.compression, global_layer=lambda c: GlobalLayer(c, **kwargs))
        if options["init_block"] == "basicdense":  # the official cell_type
            return net, "official DenseNet-Global"
        return net, "DenseNet-Global (the official one has init_block=basicdense)"
    if kind == DARTS:
        # Fewer cells, and before each reduction cell a Global layer whose H^0 is one more
        # normal cell (the official darts.DARTS_NetworkCIFAR with global_ft).
        net = type(root)(root.c, root.classifier.out_features, options["cells"],
                         root.genotype, root.stem[0].in_channels,
                         global_cell=lambda cell, c: CellGlobalLayer(cell, c, **kwargs),
                         auxiliary=root.auxiliary_head is not None)
        return net, "official DARTS-Global"
    net = ResNetGlobal(root.fc.out_features, root.conv1.in_channels,
                       parse_widths(options["widths"]), blocks=options["blocks"], **kwargs)
    return net, "official CIFAR ResNet-Global"
