"""QuadraLib's CIFAR model zoo (zarekxu/QuadraLib, ``image_classification/models``) as named
baselines: the quadratic networks ``qresnet10``, ``qresnet14``, ``qvgg7``, ``qvgg13`` and
``qmobilenet``, and their first-order skeletons ``quadralib_*`` (what ``--to quadratic``
converts into the same network).

Which convs each QuadraLib model makes quadratic (type ``ours``, its ``Quadraour`` layer: three
convs with three BNs, here one 3x-wide conv with one 3x-wide BN, the same parameters):

* ``qresnet10`` / ``qresnet14``: both 3x3 convs of every basic block; the stem and the 1x1
  projection shortcuts stay first-order (QuadraLib's ResNet has three stages of 16/32/64
  channels with [1,1,1] / [2,2,2] blocks; ``qresnet10``'s fourth list entry is unused);
* ``qvgg7`` / ``qvgg13``: every conv, the stem included (VGG cfg "Q7" = 64,64,M,128,128,M,
  256,M,512,M,512,M and cfg "D" = the 13-conv VGG-16 layout, convs with bias, BN, one Linear);
* ``qmobilenet`` (cfg "B": 64, 128/2, 128, 256/2, 256, 512/2, 512, 1024/2): the stem and both
  convs of every block, the depthwise 3x3 and the pointwise 1x1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from autobuild.models.registry import register_model
from autobuild.variants.quadratic import QuadraticConv2d

__all__ = ["QUADRALIB_MODELS", "QLMobileNet", "QLResNet", "QLVGG"]

_VGG_CFG: dict[str, list[int | str]] = {
    "Q7": [64, 64, "M", 128, 128, "M", 256, "M", 512, "M", 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
          "M"],
}
_MOBILENET_B: list[int | tuple[int, int]] = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512,
                                             (1024, 2)]


def _conv(quadratic: bool, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0,
          groups: int = 1, bias: bool = False) -> nn.Module:
    if quadratic:
        return QuadraticConv2d("ours", cin, cout, k, stride, padding, 1, groups, bias)
    return nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias)


class QLBasicBlock(nn.Module):
    """QuadraLib's ResNet block: 3x3 convs (quadratic in the q-models), 1x1 conv + BN
    projection shortcut where the shape changes (always first-order)."""

    def __init__(self, cin: int, planes: int, stride: int, quadratic: bool) -> None:
        super().__init__()
        self.conv1 = _conv(quadratic, cin, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(quadratic, planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out)


class QLResNet(nn.Module):
    """QuadraLib's CIFAR ResNet: 3x3 stem (16), three stages 16/32/64, average pool, Linear."""

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, quadratic: bool = False,
                 in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        stages = []
        for planes, count, stride in zip((16, 32, 64), blocks, (1, 2, 2), strict=False):
            layers = []
            for i in range(count):
                layers.append(QLBasicBlock(cin, planes, stride if i == 0 else 1, quadratic))
                cin = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


class QLVGG(nn.Module):
    """QuadraLib's CIFAR VGG: conv(bias) + BN + ReLU per entry, 2x2 max-pools, Linear(512)."""

    def __init__(self, cfg: str, num_classes: int = 10, quadratic: bool = False,
                 in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in _VGG_CFG[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(v, int)
            layers += [_conv(quadratic, cin, v, 3, 1, 1, bias=True), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class QLMobileNet(nn.Module):
    """QuadraLib's CIFAR MobileNet (cfg "B"): 3x3 stem (32), depthwise 3x3 + pointwise 1x1
    blocks with BN + ReLU, average pool, Linear(1024)."""

    def __init__(self, num_classes: int = 10, quadratic: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv(quadratic, in_chans, 32, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(32)
        blocks: list[nn.Module] = []
        cin = 32
        for entry in _MOBILENET_B:
            out, stride = (entry, 1) if isinstance(entry, int) else entry
            blocks.append(nn.Sequential(
                _conv(quadratic, cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin),
                nn.ReLU(), _conv(quadratic, cin, out, 1), nn.BatchNorm2d(out), nn.ReLU()))
            cin = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(self.pool(out), 1))


#: name -> (builder(quadratic, **kw), description). Each registers as ``q<name>`` (QuadraLib's
#: quadratic model) and ``quadralib_<name>`` (its first-order skeleton).
QUADRALIB_MODELS = {
    "resnet10": (lambda q, **kw: QLResNet((1, 1, 1), quadratic=q, **kw), "ResNet-10 [1,1,1]"),
    "resnet14": (lambda q, **kw: QLResNet((2, 2, 2), quadratic=q, **kw), "ResNet-14 [2,2,2]"),
    "vgg7": (lambda q, **kw: QLVGG("Q7", quadratic=q, **kw), "VGG-7 (cfg Q7)"),
    "vgg13": (lambda q, **kw: QLVGG("D", quadratic=q, **kw), "VGG with 13 convs (cfg D)"),
    "mobilenet": (lambda q, **kw: QLMobileNet(quadratic=q, **kw), "MobileNet (cfg B)"),
}


def _register() -> None:
    for name, (builder, what) in QUADRALIB_MODELS.items():
        register_model(f"q{name}", lambda b=builder, **kw: b(True, **kw),
                       input_size=(3, 32, 32), num_classes=10, source="quadralib",
                       description=f"QuadraLib q{name}: quadratic (type ours) {what}")
        register_model(f"quadralib_{name}", lambda b=builder, **kw: b(False, **kw),
                       input_size=(3, 32, 32), num_classes=10, source="quadralib",
                       description=f"QuadraLib {what}, first-order (converts to q{name})")


_register()
