"""Layer-level cost of the quadratic neuron types against the conv they replace.

For each type, times forward + backward of one converted layer (autobuild's
QuadraticConv2d, training mode) and reports time and saved-for-backward memory as ratios
to nn.Conv2d of the same shape, measured in the same run. For ``ours`` it also measures
the ``memory=save`` backward, the textbook layout QuadraLib writes (three separate convs
and three BNs, plain autograd) and that layout under ``torch.utils.checkpoint``.

    PYTHONPATH=. .venv/bin/python scripts/bench_layers.py            # CPU, 64 channels, 32x32
    PYTHONPATH=. .venv/bin/python scripts/bench_layers.py --linear   # Linear 1024 -> 1024
    .venv/bin/python scripts/bench_layers.py --device cuda --batch-size 128 --channels 256 \
        --amp --channels-last [--compile]

Timing: interleaved rounds (every layer once per round, in turn), the median per layer
after warm-up; "x ref" divides by the reference's median. Saved memory: the bytes autograd
keeps between forward and backward (``saved_tensors_hooks``, each storage once, the
layer's input included, its parameters and buffers not: ``saved_all_mib`` adds them).
``--json`` prints the same rows as one JSON object: ``{"device", "torch", "threads",
"shape", ..., "rows": [{"layer", "kernels", "ms", "ratio", "saved_mib", "saved_ratio",
"saved_all_mib", "x_quadralib_time", "x_quadralib_saved"}]}``; "ratio" is time over the
reference's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import autobuild
import autobuild.ops
from autobuild.variants.quadratic import QUADRATIC_TYPES


class ThreeBranches(nn.Module):
    """BN(W_a x) * BN(W_b x) + BN(W_c x) with three separate layers (QuadraLib's layout)."""

    def __init__(self, make: Callable[[], nn.Module], bn: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(3))
        self.bns = nn.ModuleList(bn() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = (bn(layer(x)) for layer, bn in zip(self.layers, self.bns, strict=True))
        return a * b + c


class PlainOps(nn.Module):
    """The layer through plain autograd (autobuild.ops.plain_ops): what the fused ops
    replace."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autobuild.ops.plain_ops():
            return self.inner(x)


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def saved_bytes(layer: nn.Module, x: torch.Tensor, amp: Callable) -> tuple[int, int]:
    """(activations, all) bytes autograd keeps for backward, each storage once;
    "activations" leaves out the layer's parameters and buffers (torch.utils.checkpoint
    keeps those outside autograd, so only this part compares across layouts)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp():
        out = layer(x)
    out.float().sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    state = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    total = sum(storages.values())
    return total - sum(n for p, n in storages.items() if p in state), total


def _convert(reference: nn.Module, qtype: str, memory: str, input_size: tuple[int, ...],
             linear: bool) -> nn.Module:
    """The reference's layer as a quadratic one (autobuild.convert traces image models, so
    the Linear case builds the layer directly, the way the family's build() does)."""
    if linear:
        from autobuild.variants.quadratic import QuadraticLinear

        layer = QuadraticLinear.from_linear(reference[0], qtype)
        layer.memory = memory
        return nn.Sequential(layer)
    return autobuild.convert(reference, "quadratic", sites=["0"], options={
        "type": qtype, "volterra_max_params": 10**9, "memory": memory}, input_size=input_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--linear", action="store_true",
                   help="Linear(channels, channels) on (batch·size, channels) rows instead")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--types", nargs="+", default=list(QUADRATIC_TYPES))
    p.add_argument("--volterra-max-params", type=int, default=2_000_000,
                   help="skip volterra above this kernel size (it grows as C·(9C)²)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every layer")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (robust on a shared machine; with "
                   "--threads 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    c, s = args.channels, args.size
    torch.manual_seed(0)
    if args.linear:
        x = torch.randn(args.batch_size * s, c, device=device, requires_grad=True)

        def make() -> nn.Module:
            return nn.Linear(c, c, bias=False)

        def bn() -> nn.Module:
            return nn.BatchNorm1d(c)
        k2, shape, input_size = 1, f"Linear {c}->{c}, {args.batch_size * s} rows", (c,)
    else:
        mem = torch.channels_last if args.channels_last else torch.contiguous_format
        x = torch.randn(args.batch_size, c, s, s, device=device).to(memory_format=mem)
        x.requires_grad_(True)

        def make() -> nn.Module:
            return nn.Conv2d(c, c, 3, padding=1, bias=False)

        def bn() -> nn.Module:
            return nn.BatchNorm2d(c)
        k2, shape, input_size = 9, f"3x3 conv {c}->{c}, {s}x{s}, batch {args.batch_size}", \
            (c, s, s)

    def amp() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    reference = nn.Sequential(make()).to(device)
    layers: list[tuple[str, str, nn.Module | None]] = [("reference: " + (
        "nn.Linear" if args.linear else "nn.Conv2d"), "1 conv", reference)]
    for qtype in args.types:
        if qtype == "volterra" and c * (k2 * c) ** 2 > args.volterra_max_params:
            layers.append((f"quadratic {qtype}", f"skipped: A_o has {c * (k2 * c) ** 2:,} "
                           "entries", None))
            continue
        modes = ["plain", "default", "save"] if qtype == "ours" else ["default"]
        for memory in modes:
            layer = _convert(reference, qtype, "default" if memory == "plain" else memory,
                             input_size, args.linear).to(device)
            kernels = {"fan": "2 convs", "volterra": "unfold + 2 matmuls"}.get(qtype, "1 conv")
            label = f"quadratic {qtype}" + {"save": " memory=save", "default": "",
                                            "plain": " (plain autograd)"}[memory]
            if memory == "plain":
                layer = PlainOps(layer)
            layers.append((label, kernels + (" (+1 in backward)" if memory == "save" else ""),
                           layer))
    three = ThreeBranches(make, bn).to(device)
    layers.append(("ours as 3 separate layers (QuadraLib)", "3 convs", three))
    layers.append(("... + torch.utils.checkpoint", "3 convs (+3 in backward)",
                   Checkpointed(ThreeBranches(make, bn).to(device))))

    rows = []
    for label, kernels, layer in layers:
        if layer is None:
            rows.append({"layer": label, "kernels": kernels, "ms": None, "ratio": None,
                         "saved_mib": None, "saved_all_mib": None, "saved_ratio": None})
            continue
        layer.train()
        saved, saved_all = saved_bytes(layer, x, amp)
        run = torch.compile(layer) if args.compile else layer
        rows.append({"layer": label, "kernels": kernels, "saved_mib": saved / 2**20,
                     "saved_all_mib": saved_all / 2**20, "module": layer, "run": run,
                     "times": []})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = [r for r in rows if "run" in r]
    for i in range(args.warmup + args.steps):
        for r in timed:
            sync()
            start = clock()
            with amp():
                out = r["run"](x)
            out.float().sum().backward()
            sync()
            if i >= args.warmup:
                r["times"].append(clock() - start)
            r["module"].zero_grad(set_to_none=True)
            x.grad = None
    ref = statistics.median(timed[0]["times"])
    for r in timed:
        t = statistics.median(r.pop("times"))
        r.update(ms=t * 1e3, ratio=t / ref, saved_ratio=r["saved_mib"] / timed[0]["saved_mib"])
        del r["module"], r["run"]
    three_row = next(r for r in rows if r["layer"].startswith("ours as 3"))
    for r in timed:
        r["x_quadralib_time"] = r["ms"] / three_row["ms"]
        r["x_quadralib_saved"] = r["saved_mib"] / three_row["saved_mib"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    info = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "shape": shape, "batch_size": args.batch_size, "channels": c, "size": s,
            "linear": args.linear, "amp": args.amp, "channels_last": args.channels_last,
            "compile": args.compile, "clock": args.clock, "steps": args.steps,
            "warmup": args.warmup, "rows": rows}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    flags = [f for f, on in (("bf16 AMP", args.amp), ("channels_last", args.channels_last),
                             ("torch.compile", args.compile),
                             ("CPU-time clock", args.clock == "cpu")) if on]
    print(f"forward+backward of one layer, {shape}, median of {args.steps} interleaved rounds "
          f"after {args.warmup}; {name}, torch {torch.__version__}"
          f"{', ' + ', '.join(flags) if flags else ''}\n")
    print("| layer | kernels | ms | time x ref | saved act. MiB | saved x ref | time x QuadraLib "
          "| saved x QuadraLib |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ms"] is None:
            print(f"| {r['layer']} | {r['kernels']} | - | - | - | - | - | - |")
            continue
        print(f"| {r['layer']} | {r['kernels']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
              f"{r['saved_mib']:.1f} | {r['saved_ratio']:.2f} | {r['x_quadralib_time']:.2f} | "
              f"{r['x_quadralib_saved']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
