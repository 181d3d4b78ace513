"""Training-step throughput and peak memory: the baseline vs each family, on one model.

    .venv/bin/python scripts/bench_train.py cifar_resnet20 --families quadratic multiplicative \
        --batch-size 128 --device cpu

Each variant is measured in a fresh subprocess (so peak memory is its own), with the same
random batch, SGD + the family's usual recipe (gradient clipping for quadratic and
multiplicative), after warm-up steps. Reported as images/s and peak memory, and as ratios
to the baseline measured in the same run. On CUDA, memory is ``max_memory_allocated``; on
CPU it is the rise of the process's peak resident memory during the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace, family: str) -> dict[str, float | str]:
    """Time ``args.steps`` training steps of one variant (in this process)."""
    import autobuild
    from autobuild.train.config import CLIP_FAMILIES

    torch.manual_seed(0)
    size = tuple(args.input_size)
    if family == "baseline":
        from autobuild.models import build_model

        model = build_model(args.model, num_classes=args.num_classes)
    else:
        name, _, option = family.partition(":")
        options = dict(o.split("=", 1) for o in option.split(",") if o)
        model = autobuild.convert(args.model, name, options=options,
                                  num_classes=args.num_classes, input_size=size)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    mem = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=mem).train()
    opt = torch.optim.SGD(autobuild.param_groups(model, 5e-4), lr=0.01, momentum=0.9,
                          nesterov=True)
    clip = CLIP_FAMILIES.get(family.partition(":")[0])
    x = torch.randn(args.batch_size, *size, device=device).to(memory_format=mem)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step() -> None:
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        name = f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.parameters())
    return {"variant": family, "images_per_s": args.batch_size * args.steps / seconds,
            "peak_mem_mb": peak, "params": params, "device": name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--families", nargs="+", default=["quadratic"],
                   help="family[:opt=val,...] each, e.g. quadratic:type=t4")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    for family in ["baseline", *args.families]:
        cmd = [sys.executable, *sys.argv, "--one", family]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{family}: failed: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows or rows[0]["variant"] != "baseline":
        sys.exit("the baseline failed; no ratios")
    base = rows[0]
    print(f"{args.model}, batch {args.batch_size}, input {'x'.join(map(str, args.input_size))}, "
          f"{args.steps} timed steps after {args.warmup}, {'bf16 AMP, ' if args.amp else ''}"
          f"device: {base['device']}, torch {torch.__version__}\n")
    print("| variant | params | images/s | x baseline | peak memory (MiB) | x baseline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {r['images_per_s']:.0f} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f} | {r['peak_mem_mb']:.0f} | "
              f"{r['peak_mem_mb'] / max(base['peak_mem_mb'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
