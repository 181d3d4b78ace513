"""A tiny search space on generated data: trials take about a second on 2 CPU cores."""

from __future__ import annotations

import os

import pytest

SYNTHETIC = "synthetic:size=3x8x8,classes=4,train=64,val=32"


def tiny_space(**changes):
    space = {
        "name": "tiny",
        "baseline": "cifar_resnet20",
        "data": SYNTHETIC,
        "groups": [
            {"name": "stage3", "sites": "layer3", "choices": ["keep", "pde-global"]},
            {"name": "convs", "sites": "layer1.*.conv*",
             "choices": ["keep", "quadratic:ours", "parameter-free"]},
        ],
        "objectives": ["top1", "macs"],
        "budget": {"epochs": 2, "batch_size": 32},
        "seed": 0,
        "n_trials": 4,
        "device": "cpu",
        "seeding": {"revert_top_ri": 1},
    }
    space.update(changes)
    return space


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary directory: studies/ and reports/ are created there."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("studies", exist_ok=True)
    return tmp_path
