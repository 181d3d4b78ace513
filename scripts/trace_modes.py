"""Whether autobuild's traces follow ``.train()`` / ``.eval()``: every registered baseline
(and the timm models named, with drop path and dropout on) traced once in training mode and
once in eval mode must give the same graph. fx evaluates ``self.training`` while tracing;
``autobuild.rewrite.trace`` gives the calls that take the flag as an argument the module's
flag at run time, so the two traces match unless a forward branches on the flag in Python.

    .venv/bin/python scripts/trace_modes.py [timm:resnet18 timm:efficientnet_b0 ...]

Prints each model whose traces differ with the first differing line; exits 1 if any does.
Structure only (the meta device): about a minute on 2 cores.
"""

from __future__ import annotations

import re
import sys

import torch

from autobuild.models import build_model, list_models
from autobuild.rewrite import trace


def _code(model: torch.nn.Module, mode: str) -> list[str]:
    getattr(model, mode)()
    # Constants fx lifts while tracing are numbered per trace: compare them by position.
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", trace(model).code).splitlines()


def main(extra: list[str]) -> int:
    names = [e.name for e in list_models() if e.source != "detection"] + extra
    differ, skipped = [], []
    for name in names:
        try:
            # timm models with their drop path and head dropout on: both branch on the flag
            extra = {"drop_path_rate": 0.1, "drop_rate": 0.1} if name.startswith("timm:") else {}
            with torch.device("meta"):
                model = build_model(name, num_classes=10, **extra)
            train, evaluation = _code(model, "train"), _code(model, "eval")
        except Exception as exc:  # a builder that cannot run on meta (e.g. RegNet's init)
            skipped.append(f"{name} ({str(exc).splitlines()[0][:60]})")
            continue
        if train != evaluation:
            first = next(line for line in train if line not in evaluation)
            differ.append(name)
            print(f"{name}: the training trace has `{first.strip()[:120]}`")
    print(f"{len(names) - len(skipped)} models traced in both modes, {len(differ)} differ; "
          f"skipped {len(skipped)}: {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
