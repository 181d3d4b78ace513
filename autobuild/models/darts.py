"""DARTS (Liu et al., ICLR 2019) for CIFAR: the searched DARTS-V2 cell stacked into the
evaluation network, ``cifar_darts_v2`` (36 initial channels, 20 cells: 3.35M params, the
paper's 3.3M), as PDE-Global's ``darts.py`` builds it (its baseline and, with Global layers,
DARTS-Global).

The DARTS recipe's two training devices are built: drop path inside the cells
(:class:`DropPath`; training raises its rate from 0 to ``--drop-path``, DARTS's 0.2) and the
auxiliary tower (:class:`AuxiliaryHead`, in ``cifar_darts_v2_aux``: a second classifier
after the second reduction cell whose loss training adds with ``--aux-weight``, DARTS's
0.4). The tower's 0.48M params only train; DARTS and PDE-Global count the network without
it, as ``cifar_darts_v2`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from autobuild.errors import InvalidValue
from autobuild.models.registry import register_model
from autobuild.rewrite import register_leaf_module

__all__ = ["DARTS_V2", "AuxiliaryHead", "Cell", "DartsNetwork", "DropPath", "FactorizedReduce",
           "Genotype"]

#: (normal, normal_concat, reduce, reduce_concat): each cell node sums two ops applied to
#: two earlier states (0, 1: the cell's inputs; 2..: its nodes).
Genotype = tuple[Sequence[tuple[str, int]], Sequence[int], Sequence[tuple[str, int]],
                 Sequence[int]]

DARTS_V2: Genotype = (
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    [2, 3, 4, 5],
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    [2, 3, 4, 5],
)


def _relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                  dilation: int = 1, separable: bool = False) -> list[nn.Module]:
    """ReLU, a conv (depthwise k x k then 1x1 when ``separable``), BN."""
    convs: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)]
    if separable:
        convs = [nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation, groups=c_in,
                           bias=False), nn.Conv2d(c_in, c_out, 1, bias=False)]
    return [nn.ReLU(inplace=False), *convs, nn.BatchNorm2d(c_out)]


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.op = nn.Sequential(*_relu_conv_bn(c_in, c_out, kernel, stride, padding))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """DARTS's separable conv: (ReLU, depthwise k x k, 1x1, BN) twice, the stride first."""

    def __init__(self, c: int, kernel: int, stride: int) -> None:
        super().__init__()
        p = kernel // 2
        self.op = nn.Sequential(*_relu_conv_bn(c, c, kernel, stride, p, separable=True),
                                *_relu_conv_bn(c, c, kernel, 1, p, separable=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, a dilated depthwise k x k (dilation 2), 1x1, BN."""

    def __init__(self, c: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.op = nn.Sequential(*_relu_conv_bn(c, c, kernel, stride, kernel - 1, 2,
                                               separable=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs, the second on the input shifted by
    one pixel, concatenated (DARTS's reduction of a skip and of a cell's older input)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "avg_pool_3x3": lambda c, s: nn.AvgPool2d(3, s, 1, count_include_pad=False),
    "max_pool_3x3": lambda c, s: nn.MaxPool2d(3, s, 1),
    "skip_connect": lambda c, s: nn.Identity() if s == 1 else FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, s: SepConv(c, 3, s),
    "sep_conv_5x5": lambda c, s: SepConv(c, 5, s),
    "dil_conv_3x3": lambda c, s: DilConv(c, 3, s),
    "dil_conv_5x5": lambda c, s: DilConv(c, 5, s),
}


class DropPath(nn.Module):
    """DARTS's drop path on one op's output: in training, each sample's output is zeroed
    with probability ``drop_prob`` and the others scaled by 1/(1 - ``drop_prob``); the
    identity otherwise. ``drop_prob`` starts at 0: training's schedule sets it
    (``drop_path_scheduled``). A leaf of the fx graph, so converted networks keep it.

    The rate is also kept in a 0-d buffer that compiled code reads: a float attribute would
    be a constant of the compiled graph, recompiled at every new rate."""

    drop_path_scheduled = True

    def __init__(self) -> None:
        super().__init__()
        self._drop_prob = 0.0
        self.register_buffer("rate", torch.zeros(()), persistent=False)

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = float(value)
        with torch.no_grad():
            self.rate.fill_(self._drop_prob)

    def init_non_persistent_buffers(self) -> None:
        """Fill ``rate`` after a load that left it empty (``autobuild.io``)."""
        with torch.no_grad():
            self.rate.fill_(self._drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        shape = (x.shape[0], *(1,) * (x.dim() - 1))
        if torch.compiler.is_compiling():  # the rate as data, whatever its value
            keep = 1.0 - self.rate.to(x.dtype)
            mask = (torch.rand(shape, dtype=x.dtype, device=x.device) < keep).to(x.dtype)
            return x / keep * mask
        if self._drop_prob <= 0.0:
            return x
        keep = 1.0 - self._drop_prob
        mask = torch.empty(shape, dtype=x.dtype, device=x.device)
        return x / keep * mask.bernoulli_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self._drop_prob}"


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary tower for 8x8 CIFAR features: ReLU, 5x5 average pool (stride 3),
    1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU, Linear. It passes its input on
    unchanged, so the network's output stays one tensor and the tower costs nothing at
    evaluation. While training collects them (``collect``, set by the training loop), a
    training forward also keeps the tower's logits in ``auxiliary_logits`` for the loop to
    add to the loss and let go. Module names follow the reference code."""

    SIZE = (8, 8)

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.classifier = nn.Linear(768, num_classes)
        self.collect = False
        self.auxiliary_logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.SIZE:
            raise InvalidValue(f"DARTS's auxiliary tower takes 8x8 features (32x32 images), "
                               f"not {x.shape[-2]}x{x.shape[-1]}: use cifar_darts_v2 (no "
                               "tower) at other sizes")
        if self.training and self.collect:
            self.auxiliary_logits = self.classifier(self.features(x).flatten(1))
        return x


register_leaf_module(DropPath)
register_leaf_module(AuxiliaryHead)


class Cell(nn.Module):
    """One DARTS cell on the two previous states: both are mapped to ``c`` channels, each
    node sums two ops of earlier states, the output concatenates the listed nodes."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.preprocess0: nn.Module = (FactorizedReduce(c_prev_prev, c) if reduction_prev
                                       else ReLUConvBN(c_prev_prev, c, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        ops, concat = (genotype[2], genotype[3]) if reduction else (genotype[0], genotype[1])
        self._indices = [index for _, index in ops]
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList(OPS[name](c, 2 if reduction and index < 2 else 1)
                                  for name, index in ops)
        self.drop_path = DropPath()

    def _op(self, k: int, states: list[Tensor]) -> Tensor:
        out = self._ops[k](states[self._indices[k]])
        # DARTS drops every op's output but an identity's (a skip keeps its path open).
        return out if isinstance(self._ops[k], nn.Identity) else self.drop_path(out)

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self._ops) // 2):
            states.append(self._op(2 * i, states) + self._op(2 * i + 1, states))
        return torch.cat([states[i] for i in self._concat], dim=1)


class DartsNetwork(nn.Module):
    """DARTS's CIFAR evaluation network: a 3x3 stem of 3·C channels, ``layers`` cells with
    reduction cells (channels doubled) at 1/3 and 2/3 of the depth, average pooling, a
    Linear head. ``global_cell(cell, channels)``, when given, adds before each reduction cell
    a Global layer whose H^0 is a further normal cell (PDE-Global's DARTS-Global).
    ``auxiliary`` adds the auxiliary tower after the second reduction cell."""

    def __init__(self, c: int = 36, num_classes: int = 10, layers: int = 20,
                 genotype: Genotype = DARTS_V2, in_chans: int = 3,
                 global_cell: Callable[[Cell, int], nn.Module] | None = None,
                 auxiliary: bool = False) -> None:
        super().__init__()
        self.c, self.layers, self.genotype = c, layers, genotype
        c_curr = 3 * c
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction = reduction_prev = False
        self._auxiliary_after, c_auxiliary = -1, 0
        for i in range(layers):
            if i in (layers // 3, 2 * layers // 3):
                if global_cell is not None:  # (the cell before is a normal one)
                    inner = Cell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
                    self.cells.append(global_cell(inner, c_p))
                    c_pp, c_p = c_p, inner.multiplier * c_curr
                    reduction_prev = reduction
                c_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == 2 * layers // 3:
                self._auxiliary_after, c_auxiliary = len(self.cells) - 1, c_p
        self.auxiliary_head = AuxiliaryHead(c_auxiliary, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self._auxiliary_after and self.auxiliary_head is not None:
                s1 = self.auxiliary_head(s1)  # the input, unchanged (logits kept aside)
        return self.classifier(self.global_pooling(s1).flatten(1))


register_model("cifar_darts_v2", lambda **kw: DartsNetwork(36, layers=20, **kw),
               input_size=(3, 32, 32), num_classes=10, source="cifar",
               description="DARTS-V2 (Liu et al. 2019), 36 channels, 20 cells, no auxiliary "
                           "tower")
register_model("cifar_darts_v2_aux",
               lambda **kw: DartsNetwork(36, layers=20, auxiliary=True, **kw),
               input_size=(3, 32, 32), num_classes=10, source="cifar",
               description="DARTS-V2 with its auxiliary tower (the network DARTS and "
                           "PDE-Global train: --aux-weight 0.4 --drop-path 0.2)")
