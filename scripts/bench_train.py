"""Training-step cost of each family against its own baseline: time, MACs and saved memory.

    PYTHONPATH=. .venv/bin/python scripts/bench_train.py cifar_resnet20 --batch-size 64
    PYTHONPATH=. .venv/bin/python scripts/bench_train.py resnet18 --batch-size 16 \
        --input-size 3 64 64 --json
    # on a GPU: bf16 autocast and channels_last, with and without torch.compile
    .venv/bin/python scripts/bench_train.py resnet50 --device cuda --amp --channels-last
    .venv/bin/python scripts/bench_train.py resnet50 --device cuda --amp --channels-last --compile

Everything is measured in ONE process, side by side (SPEC 6): the baseline and every
variant are built first (default sites, ``--init scratch``, train mode, one fixed random
batch), then timed in interleaved rounds — each round times one training step of every
model, in turn — so that load from other processes hits them alike. A variant's time is the
median of its timed rounds (after ``--warmup`` untimed ones), and its ratio is that median
over the baseline's median. The spread of the per-round ratios (min / max) says how noisy
the machine was.

* time ratio: the step's time over the baseline's. A step is forward + backward (train mode,
  cross-entropy loss); ``--optimizer`` adds the SGD step with the family's gradient clipping.
* MAC ratio: ``autobuild.count`` (MACs as the papers count them, one image).
* time÷MAC: time ratio / MAC ratio (1.0 = the variant runs at its arithmetic's speed).
* saved ratio: the bytes autograd keeps for backward in one training forward
  (``torch.autograd.graph.saved_tensors_hooks``, every storage counted once, parameters
  included since backward keeps them too), over the baseline's. ``saved_act`` leaves out
  the storages of parameters and buffers. On CUDA ``peak_mb`` is also reported: the peak
  of allocated memory during one step above what was allocated before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

FAMILIES = ["quadratic", "multiplicative", "parameter-free", "pde-global", "dirac"]


class PlainOps(nn.Module):
    """``VARIANT@plain``: the same model run through plain autograd (no fused op, i.e. the
    formulation the fused ops replace), for before/after ratios in one process."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from autobuild.ops import plain_ops

        with plain_ops():
            return self.inner(x)


def build(model_name: str, variant: str, args: argparse.Namespace) -> nn.Module:
    import autobuild
    from autobuild.models import build_model

    torch.manual_seed(0)
    if variant == "baseline":
        return build_model(model_name, num_classes=args.num_classes)
    variant, _, plain = variant.partition("@")
    name, _, option = variant.partition(":")
    options = dict(o.split("=", 1) for o in option.split(",") if o)
    model = autobuild.convert(model_name, name, options=options, num_classes=args.num_classes,
                              input_size=tuple(args.input_size))
    return PlainOps(model) if plain == "plain" else model


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                amp: Any) -> tuple[int, int]:
    """(all, activations only) bytes autograd saves for backward, each storage once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp():
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    total = sum(storages.values())
    return total, total - sum(n for p, n in storages.items() if p in state)


class _Traffic(TorchDispatchMode):
    """Bytes read and written by the ATen ops of a training step (views excluded): every
    tensor argument read once, every output written once — no cache reuse. Over the
    machine's copy bandwidth it is the time the step needs for memory traffic alone."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.conv_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            n = sum(t.nbytes for t in pytree.tree_leaves((args, kwargs, out))
                    if isinstance(t, torch.Tensor))
            self.bytes += n
            if "convolution" in func.name():
                self.conv_bytes += n
        return out


def traffic(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(all, convolutions') bytes moved by one training step."""
    counter = _Traffic()
    with counter:
        F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.bytes, counter.conv_bytes


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 64 MiB copy (read + write), the best of 5."""
    src = torch.empty(2**24, device=device).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--families", nargs="+", default=FAMILIES,
                   help="family[:opt=val,...][@plain] each, e.g. quadratic:memory=save; "
                   "@plain runs it through plain autograd (autobuild.ops.plain_ops)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=9, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (robust to other "
                   "processes on a shared machine; use it with --threads 1, since idle "
                   "OpenMP threads spin)")
    p.add_argument("--optimizer", action="store_true",
                   help="time the SGD step (and the family's clipping) too")
    p.add_argument("--traffic", action="store_true",
                   help="also count the bytes the step's ATen ops move (a dispatch mode; "
                   "slow) and the machine's copy bandwidth")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import autobuild
    from autobuild.train.config import CLIP_FAMILIES

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    mem = torch.channels_last if args.channels_last else torch.contiguous_format

    def amp() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, *args.input_size).to(device, memory_format=mem)
    y = torch.randint(args.num_classes, (args.batch_size,)).to(device)
    variants = ["baseline", *args.families]
    rows: list[dict[str, Any]] = []
    steps = []
    for variant in variants:
        model = build(args.model, variant, args)
        counts = autobuild.count(model, tuple(args.input_size))
        model = model.to(device, memory_format=mem).train()
        total, act = saved_bytes(model, x, y, amp)
        moved = traffic(model, x, y) if args.traffic else (0, 0)
        family = variant.partition("@")[0].partition(":")[0]
        clip = CLIP_FAMILIES.get(family) if args.optimizer else None
        opt = (torch.optim.SGD(autobuild.param_groups(model, 5e-4), lr=1e-3, momentum=0.9,
                               nesterov=True) if args.optimizer else None)
        run = torch.compile(model) if args.compile else model

        def step(model: nn.Module = model, run: nn.Module = run, opt: Any = opt,
                 clip: float | None = clip) -> None:
            with amp():
                loss = F.cross_entropy(run(x).float(), y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)

        steps.append(step)
        rows.append({"variant": variant, "params": sum(q.numel() for q in model.parameters()),
                     "macs": counts.macs, "saved_bytes": total, "saved_act_bytes": act,
                     "traffic_bytes": moved[0], "conv_traffic_bytes": moved[1], "times": []})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peaks: list[float] = [0.0] * len(rows)
    for r in range(args.warmup + args.steps):
        for i, step in enumerate(steps):
            sync()
            if device.type == "cuda" and r == args.warmup - 1:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = clock()
            step()
            sync()
            if device.type == "cuda" and r == args.warmup - 1:
                peaks[i] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            if r >= args.warmup:
                rows[i]["times"].append(clock() - start)
    base = rows[0]
    for i, row in enumerate(rows):
        t = statistics.median(row["times"])
        per_round = [a / b for a, b in zip(row["times"], base["times"], strict=True)]
        row.update({
            "time_ms": t * 1e3,
            # The median of the per-round ratios: each round times baseline and variant
            # back to back, so slow drifts of the machine's load cancel out.
            "time_ratio": statistics.median(per_round),
            "time_ratio_of_medians": t / statistics.median(base["times"]),
            "time_ratio_min": min(per_round), "time_ratio_max": max(per_round),
            "mac_ratio": row["macs"] / base["macs"],
            "saved_ratio": row["saved_bytes"] / base["saved_bytes"],
            "saved_act_ratio": row["saved_act_bytes"] / max(base["saved_act_bytes"], 1),
        })
        if args.traffic:
            row["traffic_ratio"] = row["traffic_bytes"] / base["traffic_bytes"]
        row["time_per_mac"] = row["time_ratio"] / row["mac_ratio"]
        if device.type == "cuda":
            row["peak_mb"] = peaks[i]
    for row in rows:
        del row["times"]
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({torch.get_num_threads()} threads)")
    info = {"model": args.model, "batch_size": args.batch_size,
            "input_size": list(args.input_size), "device": dev, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "amp": args.amp,
            "channels_last": args.channels_last, "compile": args.compile,
            "optimizer": args.optimizer, "clock": args.clock, "steps": args.steps,
            "warmup": args.warmup,
            "copy_bandwidth_gbs": copy_bandwidth(device) / 1e9 if args.traffic else None,
            "rows": rows}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    flags = [f for f, on in (("bf16 AMP", args.amp), ("channels_last", args.channels_last),
                             ("torch.compile", args.compile), ("+SGD", args.optimizer),
                             ("CPU-time clock", args.clock == "cpu")) if on]
    print(f"{args.model}, batch {args.batch_size}, input {'x'.join(map(str, args.input_size))}, "
          f"median of {args.steps} interleaved rounds after {args.warmup}; {dev}, torch "
          f"{torch.__version__}{', ' + ', '.join(flags) if flags else ''}\n")
    print("| variant | params | MACs | ms/step | time x | (min-max) | MACs x | time÷MACs "
          "| saved MiB | saved x | act. x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.1f}M | "
              f"{r['time_ms']:.1f} | {r['time_ratio']:.2f} | {r['time_ratio_min']:.2f}-"
              f"{r['time_ratio_max']:.2f} | {r['mac_ratio']:.2f} | {r['time_per_mac']:.2f} | "
              f"{r['saved_bytes'] / 2**20:.1f} | {r['saved_ratio']:.2f} | "
              f"{r['saved_act_ratio']:.2f} |")
    if args.traffic:
        bw = info["copy_bandwidth_gbs"]
        print(f"\nmemory traffic (ATen ops' bytes read + written, views excluded); copy "
              f"bandwidth {bw:.1f} GB/s\n")
        print("| variant | traffic GB | x baseline | at copy bandwidth, ms | of which convs, ms "
              "| measured ms |\n|---|---|---|---|---|---|")
        for r in rows:
            ms, conv_ms = r["traffic_bytes"] / bw / 1e6, r["conv_traffic_bytes"] / bw / 1e6
            print(f"| {r['variant']} | {r['traffic_bytes'] / 1e9:.2f} | {r['traffic_ratio']:.2f} "
                  f"| {ms:.0f} | {conv_ms:.0f} | {r['time_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
