"""The main job of `make demo`: convert baselines with every family and quadratic type and
print one comparison table of params / MACs / FLOPs / function-preservation error.

Uses the public API only. Runs offline on CPU in a couple of minutes:

    .venv/bin/python scripts/demo.py            # or: make demo
"""

from __future__ import annotations

import sys
import time

import torch

import autobuild
from autobuild.errors import AutobuildError
from autobuild.models import build_model, get_model_entry
from autobuild.variants import get_variant, list_variants
from autobuild.variants.quadratic import QUADRATIC_TYPES

# (baseline, family, options, label): the quadratic types on QuadraLib's two networks, then
# each family on resnet50 or the network its paper uses.
QUADRATIC_CASES = [(model, "quadratic", {"type": t}, f"type={t}", None)
                   for model in ("resnet50", "cifar_vgg16") for t in QUADRATIC_TYPES
                   if (model, t) != ("cifar_vgg16", "volterra")]
# Volterra's A_o has (C·k²)² entries: on cifar_vgg16 only the 3-channel stem is small enough.
QUADRATIC_CASES.append(("cifar_vgg16", "quadratic", {"type": "volterra"}, "type=volterra",
                        ["features.0"]))
FAMILY_CASES = [
    ("resnet50", "quadratic", {"type": "ours"}, "QuadraLib ours", None),
    ("resnet50", "multiplicative", {}, "QL blocks", None),
    ("resnet50", "multiplicative", {"layout": "qlnet"}, "QLNet-10M", None),
    ("resnet50", "parameter-free", {"layout": "max"}, "R50-max", None),
    ("resnet50", "parameter-free", {"layout": "hybrid"}, "R50-hybrid", None),
    ("resnet50", "pde-global", {}, "Global layers", None),
    ("cifar_resnet32", "pde-global", {"layout": "paper"}, "ResNet-Global", None),
    ("resnet18", "dirac", {}, "DiracNet-18", None),
]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _row(model_name: str, family: str, options: dict, label: str,
         sites: list[str] | None, baselines: dict) -> list[str]:
    entry = get_model_entry(model_name)
    if model_name not in baselines:
        torch.manual_seed(0)
        base = build_model(model_name).eval()
        baselines[model_name] = (base, autobuild.count(base, entry.input_size))
    base, base_counts = baselines[model_name]
    variant = get_variant(family)
    init = "preserve" if "preserve" in variant.inits else "scratch"
    try:
        model = autobuild.convert(base, family, options=options, init=init, sites=sites,
                                  input_size=entry.input_size)
    except AutobuildError as exc:
        if init == "preserve" and "preserve" in str(exc):  # types without a linear term
            init = "scratch"
            model = autobuild.convert(base, family, options=options, sites=sites,
                                      input_size=entry.input_size)
        else:
            return [model_name, family, label, "-", "-", "-", "-", f"refused: {exc}"]
    counts = autobuild.count(model, entry.input_size)
    error = "n/a (scratch)"
    if init == "preserve":
        x = torch.randn(2, *entry.input_size)
        model.eval()
        with torch.no_grad():
            y0, y1 = base(x), model(x)
        error = f"{float((y0 - y1).abs().max() / y0.abs().max()):.1e}"
    return [model_name, family, label, str(len(autobuild.plan_of(model).sites)),
            f"{_human(base_counts.params)} -> {_human(counts.params)}",
            f"{_human(base_counts.macs)} -> {_human(counts.macs)}",
            f"{_human(base_counts.flops)} -> {_human(counts.flops)}", error]


def _print_table(title: str, rows: list[list[str]]) -> None:
    header = ["baseline", "family", "variant", "sites", "params", "MACs", "FLOPs",
              "preservation error (rel.)"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> int:
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    registered = {v.name for v in list_variants()}
    baselines: dict = {}
    _print_table("Quadratic neuron types (QuadraLib), converted at the default sites "
                 "(every conv but the stem; volterra: the convs under its size limit)",
                 [_row(*case, baselines) for case in QUADRATIC_CASES])
    cases = [c for c in FAMILY_CASES if c[1] in registered]
    # A family added later shows up here too, with its defaults on resnet50.
    cases += [("resnet50", name, {}, "defaults", None) for name in sorted(registered)
              if all(c[1] != name for c in FAMILY_CASES)]
    _print_table("All families (each on resnet50 or its paper's network, 224x224 / 32x32)",
                 [_row(*case, baselines) for case in cases])
    print("\nPreservation error: max |converted - baseline| / max |baseline| on random "
          "inputs in eval mode (init=preserve).")
    _mixed_placement()
    _small_search()
    print(f"\n{time.time() - start:.0f} s.")
    return 0


def _mixed_placement() -> None:
    """Four families in one placement, costed before building, then built."""
    a = autobuild.analyze("resnet50")
    p = autobuild.Placement({"layer1.0.conv2": "quadratic:ours", "layer2.0": "multiplicative",
                             "layer3": "pde-global", "layer4.0.conv2": "parameter-free"})
    predicted = a.cost(p)
    counted = autobuild.count(a.build(p))
    print(f"\nA mixed placement on resnet50 ({p.summary()}), key {p.key}:\n"
          f"  predicted before building: {_human(predicted.params)} params, "
          f"{_human(predicted.macs)} MACs; counted after: {_human(counted.params)}, "
          f"{_human(counted.macs)}")


def _small_search() -> None:
    """A real search (6 trials, one short epoch each) with its report and dashboard hint."""
    import os
    import shutil

    from autobuild.search import load_space, run, write_report

    mini = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-mini")
    data = (f"imagefolder:{os.path.abspath(mini)}" if os.path.isdir(mini)
            else "synthetic:size=3x32x32,classes=10,train=512,val=256")
    for stale in ("studies/demo.db", "studies/demo-artifacts", "reports/demo"):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.remove(stale)
    space = load_space("search_spaces/cifar10-resnet20-mixed.yaml", [
        "name=demo", f"data={data}", "budget.epochs=1", "budget.batch_size=64",
        "budget.train_subset=512", "n_trials=6", "seeding.revert_top_ri=2"])
    print(f"\nA small search: {space.baseline} on {data.split(':')[0]}, "
          f"{space.n_trials} trials of one epoch on 512 images (search_spaces/"
          "cifar10-resnet20-mixed.yaml)")
    study = run(space, quiet=True)
    result = write_report(study, "reports/demo", force=True)  # the demo's own report
    with open("reports/demo/report.md") as f:
        print(f.read())
    print(f"Report files in {result['out']}/ (trials.csv, report.md, pareto.png, ri.csv).\n"
          "Review the study in optuna-dashboard:  .venv/bin/autobuild dashboard --study demo")


if __name__ == "__main__":
    sys.exit(main())
