"""CIFAR baselines as the papers define them.

``cifar_resnet{20,32,44,56,110}``: He et al. 2016, section 4.2 — three stages of 16/32/64
channels with n = (depth-2)/6 basic blocks each and parameter-free "option A" shortcuts
(stride-2 subsampling plus zero channel padding), giving 0.27M/0.46M/0.66M/0.85M/1.7M params.
``cifar_vgg{11,13,16,19}``: the VGG convolution stacks with BN and a single Linear(512, n)
head, the network QuadraLib converts (14.73M params for VGG-16).
``cifar_densenet_bc{100,250,190}``: Huang et al. 2017's DenseNet-BC for CIFAR (growth rate
12/24/40, three dense blocks of (depth-4)/6 bottleneck layers, compression 0.5, a 3x3 stem of
2·growth channels): 0.8M/15.3M/25.6M params, the baseline of PDE-Global's DenseNet-Global.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.models.registry import register_model

__all__ = ["CifarBasicBlock", "CifarDenseNet", "CifarResNet", "CifarVGG", "DenseLayer",
           "PadShortcut", "Transition", "dense_block"]


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    def __init__(self, depth: int = 16, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class DenseLayer(nn.Module):
    """DenseNet-BC's bottleneck layer, BN-ReLU-1x1 conv (bn_size·growth)-BN-ReLU-3x3 conv
    (growth), returning its input with the new features appended (concatenating at each
    layer is the same function as concatenating every earlier output, and fx traces it)."""

    def __init__(self, in_features: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        # The module names of the reference DenseNet (gpleiss/efficient_densenet_pytorch,
        # which PDE-Global ships), so its weights load by name.
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(self.relu1(self.norm1(x)))
        return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool between dense blocks."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_features)), ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_features, out_features, 1, bias=False)),
            ("pool", nn.AvgPool2d(2, 2))]))


def dense_block(layers: int, in_features: int, growth: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        (f"denselayer{i + 1}", DenseLayer(in_features + i * growth, growth))
        for i in range(layers)))


class CifarDenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs; ``global_layer(channels)``, when given, is inserted
    after each transition (PDE-Global's DenseNet-Global)."""

    def __init__(self, growth: int = 12, block_config: tuple[int, ...] = (16, 16, 16),
                 num_classes: int = 10, in_chans: int = 3, compression: float = 0.5,
                 global_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.growth, self.block_config, self.compression = growth, tuple(block_config), compression
        c = 2 * growth
        self.features = nn.Sequential(OrderedDict(
            [("conv0", nn.Conv2d(in_chans, c, 3, padding=1, bias=False))]))
        for i, layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", dense_block(layers, c, growth))
            c += layers * growth
            if i != len(block_config) - 1:
                out = int(c * compression)
                self.features.add_module(f"transition{i + 1}", Transition(c, out))
                c = out
                if global_layer is not None:
                    self.features.add_module(f"global{i + 1}", global_layer(c))
        self.features.add_module("norm_final", nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():  # the reference init: N(0, 2/(k·k·out)) convs, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.features(x))
        return self.classifier(self.avgpool(x).flatten(1))


#: DenseNet-BC's CIFAR configurations (Huang et al., Table 2): depth -> growth rate.
DENSENET_BC = {100: 12, 250: 24, 190: 40}


def _register() -> None:
    for depth in (20, 32, 44, 56, 110):
        register_model(
            f"cifar_resnet{depth}",
            lambda depth=depth, **kw: CifarResNet(depth, **kw),
            input_size=(3, 32, 32), num_classes=10, source="cifar",
            description=f"He et al. 2016 CIFAR ResNet-{depth} (16/32/64, option A shortcuts)",
        )
    for depth in VGG_CONFIGS:
        register_model(
            f"cifar_vgg{depth}",
            lambda depth=depth, **kw: CifarVGG(depth, **kw),
            input_size=(3, 32, 32), num_classes=10, source="cifar",
            description=f"VGG-{depth} with BN and one Linear(512, classes) head (QuadraLib)",
        )
    for depth, growth in DENSENET_BC.items():
        n = (depth - 4) // 6
        register_model(
            f"cifar_densenet_bc{depth}",
            lambda growth=growth, n=n, **kw: CifarDenseNet(growth, (n, n, n), **kw),
            input_size=(3, 32, 32), num_classes=10, source="cifar",
            description=f"Huang et al. 2017 DenseNet-BC (L={depth}, k={growth}) for CIFAR",
        )


_register()
