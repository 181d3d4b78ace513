"""The device a run, an analysis or a search trial uses, checked before any work: a device
this machine does not have is one line naming the flag, not an error inside a trial."""

from __future__ import annotations

from typing import Any

import torch

from autobuild.errors import AutobuildError

__all__ = ["check_device", "check_sync_bn", "resolve_device"]


def check_device(name: str, flag: str = "--device") -> None:
    """Refuse ``cuda`` without a GPU, ``cuda:N`` beyond the GPUs present and ``mps``
    without MPS (``auto`` and ``cpu`` always exist)."""
    kind, _, index = str(name).partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise AutobuildError(f"{flag} {name}: no CUDA GPU is visible on this machine "
                                 "(use cpu)")
        if index.isdigit() and int(index) >= count:
            raise AutobuildError(f"{flag} {name}: this machine has {count} CUDA GPU"
                                 f"{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise AutobuildError(f"{flag} {name}: MPS is not available on this machine (use cpu"
                             f"{' or cuda' if torch.cuda.is_available() else ''})")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``name`` as a torch device (``auto``: CUDA where there is one; ``cuda`` under
    torchrun: this process's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    if name == "cuda":  # one GPU per torchrun process
        name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise AutobuildError(f"bad --device {name!r}: {exc}") from exc


def check_sync_bn(cfg: Any, key: str = "--sync-bn") -> None:
    """``--sync-bn`` where the run would not be on CUDA: refused before any work."""
    if cfg.sync_bn and resolve_device(str(cfg.device)).type != "cuda":
        raise AutobuildError(f"{key} needs CUDA (torch's SyncBatchNorm is GPU-only)")
