"""Counting: MACs as the papers count them, FLOPs with elementwise work, per module."""

from __future__ import annotations

import torch
from torch import nn

from autobuild.counting import count


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.conv(x)
        y = self.dw(y * y)  # one elementwise product
        return self.fc(self.pool(torch.relu(y)).flatten(1))


def test_macs_and_flops_by_formula() -> None:
    c = count(Tiny(), (3, 8, 8))
    conv, dw, fc = 64 * 8 * 3 * 9, 64 * 8 * 9, 128 * 5
    assert c.macs == conv + dw + fc
    assert c.module_macs["dw"] == dw
    elementwise = 8 * 64 + 8 * 64  # the product and the ReLU
    pool = 8 * 16 * 4  # 2x2 window per output
    assert c.flops == 2 * c.macs + elementwise + pool
    assert c.params == sum(p.numel() for p in Tiny().parameters())
    assert c.module_params["fc"] == 128 * 5 + 5


def test_batch_norm_counts_two_flops_per_element_and_mode_is_restored() -> None:
    m = nn.Sequential(nn.BatchNorm2d(4))
    m.train()
    c = count(m, (4, 2, 2))
    assert c.flops == 2 * 16 and c.macs == 0
    assert m.training
