"""Does RI seeding help? The same search run with its seeds (baseline, all-converted, and
placements reverting the top-RI sites, then NSGA-II) and with plain random sampling, the same
number of trials, for several seeds; the hypervolume each reaches after N trials.

    .venv/bin/python scripts/search_efficiency.py [--trials 10] [--seeds 0 1 2] [--json]

Data: the real CIFAR-10 images in ../shared/data/cifar10-mini (synthetic data otherwise, or
--data). Space: search_spaces/cifar10-resnet20-mixed.yaml with a small per-trial budget.
Hypervolume: docs/search.md (reference point 0% top-1, 2x the baseline's MACs). Public API.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MINI = os.path.join(HERE, "..", "..", "shared", "data", "cifar10-mini")
STRATEGIES = {
    "ri-seeded": ["sampler=nsga2", "seeding.baseline=true", "seeding.all_converted=true",
                  "seeding.revert_top_ri=3"],
    "random": ["sampler=random", "seeding.baseline=false", "seeding.all_converted=false",
               "seeding.revert_top_ri=0"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--space", default=os.path.join(HERE, "..", "search_spaces",
                                                        "cifar10-resnet20-mixed.yaml"))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES),
                        default=list(STRATEGIES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from autobuild.search import hypervolume, load_space, run

    data = args.data or (f"imagefolder:{os.path.abspath(MINI)}" if os.path.isdir(MINI)
                         else "synthetic:size=3x32x32,classes=10,train=2048,val=512")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.strategies:
                overrides = STRATEGIES[name]
                space = load_space(args.space, [
                    f"name={name}-{seed}", f"data={data}", f"seed={seed}",
                    f"budget.epochs={args.epochs}", f"budget.train_subset={args.subset}",
                    "budget.batch_size=128", "pruning.enabled=false", *overrides])
                start = time.perf_counter()
                study = run(space, n_trials=args.trials, quiet=True,
                            storage=f"sqlite:///{tmp}/{name}-{seed}.db")
                trials = sorted(study.trials, key=lambda t: t.number)
                half = hypervolume(study, trials[: args.trials // 2])
                rows.append({"strategy": name, "seed": seed, "trials": len(trials),
                             "hv_half": round(half, 4), "hv": round(hypervolume(study), 4),
                             "pareto": len(study.best_trials),
                             "minutes": round((time.perf_counter() - start) / 60, 1)})
                if not args.json:
                    print(rows[-1], flush=True)
    summary = {}
    for name in args.strategies:
        hv = [r["hv"] for r in rows if r["strategy"] == name]
        half = [r["hv_half"] for r in rows if r["strategy"] == name]
        summary[name] = {"hv_mean": round(statistics.mean(hv), 4),
                         "hv_std": round(statistics.pstdev(hv), 4),
                         "hv_half_mean": round(statistics.mean(half), 4)}
    result = {"data": data.split(":")[0], "trials": args.trials, "epochs": args.epochs,
              "train_subset": args.subset, "runs": rows, "summary": summary}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, s in summary.items():
            print(f"{name:10s} hypervolume after {args.trials} trials {s['hv_mean']:.4f} "
                  f"± {s['hv_std']:.4f} (after {args.trials // 2}: {s['hv_half_mean']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
