"""Layer-level speed of the quadratic neuron types against the conv they replace.

For each type, times forward + backward of one converted layer (autobuild's
QuadraticConv2d) and reports it as a ratio to nn.Conv2d of the same shape measured in the
same run. For ``ours`` it also times the textbook layout — three separate convs and three
BNs, as QuadraLib writes it — to show what running the branches as one conv buys.

    .venv/bin/python scripts/bench_layers.py                      # CPU, 64 channels, 32x32
    .venv/bin/python scripts/bench_layers.py --device cuda --batch-size 128 --channels 256

Public API only (autobuild.convert on a one-conv model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import autobuild
from autobuild.variants.quadratic import QUADRATIC_TYPES


class ThreeConvs(nn.Module):
    """BN(conv_a x) * BN(conv_b x) + BN(conv_c x) with three separate convs (QuadraLib)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = (bn(conv(x)) for conv, bn in zip(self.convs, self.bns, strict=True))
        return a * b + c


def _time(layer: nn.Module, x: torch.Tensor, steps: int, warmup: int) -> float:
    """Median seconds of one forward + backward."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        layer(x).sum().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--volterra-max-params", type=int, default=2_000_000,
                   help="skip volterra above this kernel size (it grows as C·(9C)²)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    c, s = args.channels, args.size
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, c, s, s, device=device, requires_grad=True)

    conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False)).to(device)
    reference = _time(conv, x, args.steps, args.warmup)
    rows = [("nn.Conv2d (reference)", reference, "1 conv")]
    for qtype in QUADRATIC_TYPES:
        if qtype == "volterra" and c * (9 * c) ** 2 > args.volterra_max_params:
            rows.append((f"quadratic {qtype}", float("nan"),
                         f"skipped: A_o has {c * (9 * c) ** 2:,} entries"))
            continue
        layer = autobuild.convert(conv, "quadratic", sites=["0"], options={
            "type": qtype, "volterra_max_params": 10**9}, input_size=(c, s, s)).to(device)
        kernels = {"fan": "2 convs", "volterra": "unfold + 2 matmuls"}.get(qtype, "1 conv")
        rows.append((f"quadratic {qtype}", _time(layer, x, args.steps, args.warmup), kernels))
    three = ThreeConvs(c).to(device)
    rows.append(("ours as 3 separate convs", _time(three, x, args.steps, args.warmup),
                 "3 convs"))
    # The reference is timed first and last; the ratios use the mean (drift on a busy CPU).
    reference = (reference + _time(conv, x, args.steps, args.warmup)) / 2
    rows[0] = ("nn.Conv2d (reference)", reference, "1 conv")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"forward+backward of one 3x3 layer, {c}->{c} channels, {s}x{s}, batch "
          f"{args.batch_size}, median of {args.steps} after {args.warmup}; {name}, "
          f"torch {torch.__version__}\n")
    print("| layer | kernels | ms | x nn.Conv2d |\n|---|---|---|---|")
    for label, seconds, kernels in rows:
        ms = "-" if seconds != seconds else f"{seconds * 1e3:.2f}"
        ratio = "-" if seconds != seconds else f"{seconds / reference:.2f}"
        print(f"| {label} | {kernels} | {ms} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
