"""Throughput of 1, 2 and 4 search workers (separate processes) on one PostgreSQL study of
cheap trials (synthetic 8x8 images, a CIFAR ResNet-20, one epoch of 256 images), and the
non-training time each trial spends (sampling, costing, building, storage round trips).
Throughput is counted from the first trial's start to the last one's end (a worker's start-up,
imports and the baseline's analysis, is reported apart as ``startup_s``).

    .venv/bin/python scripts/bench_workers.py [--trials 16] [--workers 1 2 4] [--json]

Starts a throw-away PostgreSQL server (scripts/postgres.sh) unless AUTOBUILD_TEST_POSTGRES
points at one; each run gets a fresh database. Public API and CLI only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import optuna
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SPACE = {
    "name": "bench", "baseline": "cifar_resnet20",
    "data": "synthetic:size=3x8x8,classes=4,train=256,val=64",
    "groups": [{"name": "stage3", "sites": "layer3", "choices": ["keep", "pde-global"]},
               {"name": "convs", "sites": "layer*.*.conv*", "per_site": True,
                "choices": ["keep", "quadratic:ours", "parameter-free"]}],
    "objectives": ["top1", "macs"], "budget": {"epochs": 1, "batch_size": 32},
    "sampler": "random", "device": "cpu", "seeding": {"revert_top_ri": 0},
}


def _database(server: str) -> str:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql"),
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


def _run(server: str, workers: int, trials: int, space_path: str) -> dict:
    url = _database(server)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    cmd = [sys.executable, "-m", "autobuild", "search", space_path, "--storage", url,
           "--join", "--quiet", "--n-trials", str(trials)]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed: {err[-1000:]}")
    wall = time.perf_counter() - start
    launched = time.time() - wall
    study = optuna.load_study(study_name="bench", storage=url)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    lifetimes = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    trained = [t for t in done if "train_s" in t.user_attrs]
    overhead = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["train_s"]
                for t in trained]
    first = min(t.datetime_start for t in done).timestamp()
    span = max(t.datetime_complete for t in done).timestamp() - first
    return {"workers": workers, "trials": len(done), "wall_s": round(wall, 1),
            "startup_s": round(first - launched, 1),
            "trials_per_min": round(60 * len(done) / span, 2),
            "median_trial_s": round(statistics.median(lifetimes), 2),
            "median_overhead_s": round(statistics.median(overhead), 3) if overhead else None,
            "reused": sum("reused_from" in t.user_attrs for t in done)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = os.environ.get("AUTOBUILD_TEST_POSTGRES")
    pgdir = None
    if not server:
        pgdir = tempfile.mkdtemp(prefix="autobuild-pg.", dir="/tmp")
        out = subprocess.run([os.path.join(HERE, "postgres.sh"), "start", pgdir],
                             capture_output=True, text=True, check=True).stdout
        if "AUTOBUILD_TEST_POSTGRES=" not in out:
            raise SystemExit("no PostgreSQL server binaries: install postgresql or set "
                             "AUTOBUILD_TEST_POSTGRES")
        server = out.strip().split("=", 1)[1]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            space_path = os.path.join(tmp, "space.yaml")
            with open(space_path, "w") as f:
                yaml.safe_dump(SPACE, f)
            rows = [_run(server, w, args.trials, space_path) for w in args.workers]
    finally:
        if pgdir:
            subprocess.run([os.path.join(HERE, "postgres.sh"), "stop", pgdir], check=False)
    result = {"cpus": os.cpu_count(), "runs": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        base = rows[0]["trials_per_min"]
        for r in rows:
            print(f"{r['workers']} worker(s): {r['trials_per_min']:6.2f} trials/min "
                  f"({r['trials_per_min'] / base:.2f}x), median trial {r['median_trial_s']} s, "
                  f"non-training time per trial {r['median_overhead_s']} s, "
                  f"{r['reused']} reused, start-up {r['startup_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
