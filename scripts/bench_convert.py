"""How fast autobuild analyses a baseline, builds a placement and loads a saved model, as
ratios to constructing the same network with torchvision, measured side by side in one
process (SPEC §6: ratios, interleaved repetitions, the median).

    .venv/bin/python scripts/bench_convert.py [--model resnet50] [--repeats 7] [--json]

Goals (issues 8 and 11): analysis <= 3x construction; a build from the analysis <= 1.5x;
``autobuild.load`` of a saved conversion <= 1.3x. Public API only.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torchvision

import autobuild
from autobuild.rewrite import Placement


def random_placement(analysis: autobuild.Analysis, seed: int, p_convert: float = 0.5
                     ) -> Placement:
    """A random feasible placement: each site, in random order, keeps the baseline or takes
    a random family that accepts it, unless it overlaps a choice already made."""
    from autobuild.variants import list_variants

    rng = random.Random(seed)
    sites = [s for s in analysis.sites() if s.kind != "network"]
    rng.shuffle(sites)
    chosen: dict[str, str] = {}
    regions = []
    for site in sites:
        if rng.random() > p_convert:
            continue
        takers = [v for v in list_variants() if v.accepts(site, v.parse_options({}))
                  and not v.refusal(site, v.parse_options({}), analysis)]
        if not takers:
            continue
        family = rng.choice(takers)
        region = family.region(site, family.parse_options({}), analysis)
        if any(region.overlaps(r) for r in regions):
            continue
        chosen[site.name] = family.name
        regions.append(region)
    return Placement(chosen)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classifier name")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    builder = getattr(torchvision.models, args.model)

    analysis = autobuild.analyze(args.model)  # warm-up: imports, first trace
    placements = [random_placement(analysis, seed) for seed in range(args.repeats)]
    times: dict[str, list[float]] = {"construct": [], "analyze": [], "build": [], "load": [],
                                     "cost": []}
    with tempfile.TemporaryDirectory() as tmp:
        saved, sizes = [], []
        for i, p in enumerate(placements):
            path = f"{tmp}/run{i}"
            built = analysis.build(p)
            sizes.append(sum(t.numel() for t in built.parameters()))
            autobuild.save(built, path)
            saved.append(path)
        for i in range(args.repeats):
            times["construct"].append(_time(builder))
            times["analyze"].append(_time(lambda: autobuild.analyze(args.model)))
            fresh = autobuild.analyze(args.model)
            times["cost"].append(_time(lambda p=placements[i], a=fresh: a.cost(p)))
            times["build"].append(_time(lambda p=placements[i]: analysis.build(p)))
            times["load"].append(_time(lambda path=saved[i]: autobuild.load(path)))
    median = {k: statistics.median(v) for k, v in times.items()}
    ref = median["construct"]
    # A build initialises every new layer, and a converted network is often larger than its
    # baseline (a quadratic conv has 3x the weights): the build's time per parameter built,
    # against construction's, separates the engine's overhead from the bigger network's init.
    base_params = sum(t.numel() for t in builder().parameters())
    per_param = statistics.median(b / n for b, n in zip(times["build"], sizes, strict=True))
    result = {
        "model": args.model, "device": "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "sites_converted": statistics.median(len(p) for p in placements),
        "families": sorted({f for p in placements for f in p.families}),
        **{f"{k}_ms": round(1000 * v, 1) for k, v in median.items()},
        "analyze_ratio": round(median["analyze"] / ref, 2),
        "build_ratio": round(median["build"] / ref, 2),
        "load_ratio": round(median["load"] / ref, 2),
        "cost_ratio": round(median["cost"] / ref, 2),
        "built_params_ratio": round(statistics.median(sizes) / base_params, 2),
        "build_ratio_per_param": round(per_param / (ref / base_params), 2),
        "goals": {"analyze_ratio": 3.0, "build_ratio": 1.5, "load_ratio": 1.3},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: construction {result['construct_ms']} ms (torchvision, reference)")
        for key in ("analyze", "build", "load", "cost"):
            goal = result["goals"].get(f"{key}_ratio")
            print(f"  {key:8s} {result[f'{key}_ms']:8.1f} ms  {result[f'{key}_ratio']:5.2f}x"
                  + (f"  (goal <= {goal}x)" if goal else ""))
        print(f"  built networks have {result['built_params_ratio']}x the baseline's "
              f"parameters; build time per parameter {result['build_ratio_per_param']}x "
              "construction's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
