"""CIFAR baselines as the papers define them.

``cifar_resnet{20,32,44,56,110}``: He et al. 2016, section 4.2 — three stages of 16/32/64
channels with n = (depth-2)/6 basic blocks each and parameter-free "option A" shortcuts
(stride-2 subsampling plus zero channel padding), giving 0.27M/0.46M/0.66M/0.85M/1.7M params.
``cifar_vgg{11,13,16,19}``: the VGG convolution stacks with BN and a single Linear(512, n)
head, the network QuadraLib converts (14.73M params for VGG-16).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from autobuild.models.registry import register_model

__all__ = ["CifarBasicBlock", "CifarResNet", "CifarVGG", "PadShortcut"]


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


_register()
