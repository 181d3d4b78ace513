"""The resumable checkpoint: state dicts and RNG states, loadable with ``weights_only=True``."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from autobuild.errors import AutobuildError

__all__ = ["CHECKPOINT_FILE", "get_rng_state", "load_checkpoint", "save_checkpoint",
           "set_rng_state"]

CHECKPOINT_FILE = "checkpoint.pt"


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states, as plain lists and tensors only."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Written atomically: a crash mid-write leaves the previous checkpoint intact."""
    from autobuild.files import atomic_torch_save

    atomic_torch_save(state, path)


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise AutobuildError(f"no checkpoint at {path!r}: nothing to resume (train without "
                             "--resume to start a run; --force to start it over a run that "
                             "stopped before its first checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip, unpickling refused...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutobuildError(f"corrupt checkpoint {path!r}: {first}") from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise AutobuildError(f"corrupt checkpoint {path!r}: not an autobuild training checkpoint")
    return state
