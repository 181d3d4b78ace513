"""torch.compile over every family: one graph, no graph break (the fused training ops
included), and compiled outputs/gradients equal to eager ones. The ``aot_eager`` backend
runs dynamo and AOTAutograd (what traces the custom Functions) without a C++ compiler."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import autobuild

FAMILIES = [("quadratic", {}), ("quadratic", {"memory": "save"}), ("multiplicative", {}),
            ("multiplicative", {"memory": "save"}), ("parameter-free", {}), ("pde-global", {}),
            ("dirac", {})]
IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}".rstrip("-") for f, o in FAMILIES]


def _model(family: str, options: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return autobuild.convert("cifar_resnet20", family, options=options)


@pytest.mark.parametrize("family,options", FAMILIES, ids=IDS)
def test_one_graph_no_break(family: str, options: dict) -> None:
    model = _model(family, options)
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            explained = torch._dynamo.explain(model)(x)
        assert explained.graph_count == 1, explained.break_reasons
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("family,options", FAMILIES, ids=IDS)
def test_compiled_matches_eager(family: str, options: dict) -> None:
    model = _model(family, options)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(10, (4,))
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    # A training step: loss and gradients (through the fused Functions' backward).
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(compiled(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        scale = max(1.0, float(p.grad.abs().max()))
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name
    # Eval outputs after that step (running statistics updated alike).
    model.eval()
    twin.eval()
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
