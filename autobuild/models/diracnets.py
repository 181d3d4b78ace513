"""DiracNets as named baselines (Zagoruyko & Komodakis, arXiv 1706.00388; code
szagoruyko/diracnets, ``define_diracnet`` of ``diracnet.py`` on branches master = v2 and v1).

A DiracNet is a plain chain: stem, then groups of ``[ReLU → Dirac conv → BN]`` blocks (v1:
``NCReLU`` instead of ReLU), a 2x2 max-pool between groups, global average pooling and a
Linear head.

* CIFAR (``cifar_diracnet{depth}_{width}``, the paper's "DiracNet-depth-width"): 3x3 stem +
  BN + ReLU, three groups of 2·(depth-4)/6 blocks with 16/32/64 × width channels.
* ImageNet (``diracnet18``/``diracnet34`` v2, ``diracnet18_v1``/``diracnet34_v1``,
  ``diracnet18_075_v1``, the released v1 model): 7x7/2 stem + BN, 3x3/2 max-pool, four
  groups of 2·[2,2,2,2] or 2·[3,4,6,3] blocks with 64/128/256/512 × width channels.

v2 applies a ReLU before the pooling head; v1 does not (as the reference code). The v2
ImageNet nets are also what ``autobuild convert resnet18 --to dirac`` builds from a ResNet;
the presets here are the reference code's exact layout, to train from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from autobuild.errors import AutobuildError
from autobuild.models.registry import register_model
from autobuild.variants._dirac_layers import DiracConvV1
from autobuild.variants.dirac import DiracConv2d

__all__ = ["CIFAR_PRESETS", "DiracNet", "diracnet"]

#: (depth, width) of the CIFAR DiracNets registered by name.
CIFAR_PRESETS = ((16, 1), (28, 1), (28, 2), (28, 5), (28, 10), (34, 1), (34, 2), (34, 4),
                 (52, 1))
_IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class DiracBlock(nn.Sequential):
    """ReLU → Dirac conv → BN (v1: the conv applies NCReLU itself)."""

    def __init__(self, cin: int, cout: int, version: str) -> None:
        if version == "v1":
            super().__init__(DiracConvV1(cin, cout), nn.BatchNorm2d(cout))
        else:
            super().__init__(nn.ReLU(), DiracConv2d(cin, cout, 3), nn.BatchNorm2d(cout))


class DiracNet(nn.Module):
    """A DiracNet of the reference code (see the module docstring)."""

    def __init__(self, groups: Sequence[int], widths: Sequence[int], *, imagenet: bool,
                 version: str = "v2", num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if version not in ("v1", "v2"):
            raise AutobuildError(f"DiracNet version {version!r} is not valid; valid: v1, v2")
        w0 = widths[0]
        if imagenet:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(w0), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w0, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(w0), nn.ReLU())
        layers: list[nn.Module] = []
        cin = w0
        for i, (count, width) in enumerate(zip(groups, widths, strict=True)):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(count):
                layers.append(DiracBlock(cin, width, version))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head_relu = nn.ReLU() if version == "v2" else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.version = version

    def forward(self, x: Tensor) -> Tensor:
        x = self.head_relu(self.features(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def diracnet(depth: int, width: float = 1.0, *, imagenet: bool = False, version: str = "v2",
             num_classes: int | None = None, in_chans: int = 3) -> DiracNet:
    """DiracNet-``depth``-``width`` as the reference ``define_diracnet`` builds it: CIFAR
    depth 6n+4 (three groups of 2n blocks), ImageNet depth 18 or 34."""
    if imagenet:
        if depth not in _IMAGENET_BLOCKS:
            raise AutobuildError(f"ImageNet DiracNet depth {depth} is not valid; valid: 18, 34")
        groups = [2 * b for b in _IMAGENET_BLOCKS[depth]]
        base: tuple[int, ...] = (64, 128, 256, 512)
    else:
        if depth < 10 or (depth - 4) % 6:
            raise AutobuildError(f"CIFAR DiracNet depth {depth} is not 6n+4 (n >= 1), e.g. 28")
        groups = [2 * ((depth - 4) // 6)] * 3
        base = (16, 32, 64)
    widths = [int(v * width) for v in base]
    classes = num_classes if num_classes is not None else (1000 if imagenet else 10)
    return DiracNet(groups, widths, imagenet=imagenet, version=version, num_classes=classes,
                    in_chans=in_chans)


def _register() -> None:
    for depth, width in CIFAR_PRESETS:
        for version in ("v2", "v1"):
            suffix = "" if version == "v2" else "_v1"
            register_model(
                f"cifar_diracnet{depth}_{width}{suffix}",
                lambda d=depth, w=width, v=version, **kw: diracnet(d, w, version=v, **kw),
                input_size=(3, 32, 32), num_classes=10, source="diracnets",
                description=f"DiracNet-{depth}-{width} {version} (CIFAR, Zagoruyko & "
                            f"Komodakis 2017)")
    for name, depth, width, version in (("diracnet18", 18, 1.0, "v2"),
                                        ("diracnet34", 34, 1.0, "v2"),
                                        ("diracnet18_v1", 18, 1.0, "v1"),
                                        ("diracnet34_v1", 34, 1.0, "v1"),
                                        ("diracnet18_075_v1", 18, 0.75, "v1")):
        register_model(
            name, lambda d=depth, w=width, v=version, **kw: diracnet(d, w, imagenet=True,
                                                                     version=v, **kw),
            input_size=(3, 224, 224), num_classes=1000, source="diracnets",
            description=f"DiracNet-{depth}{'-0.75' if width != 1 else ''} {version} (ImageNet)")


_register()
