"""The training recipe: one dataclass, every field a CLI flag of ``autobuild train``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from autobuild.errors import AutobuildError

__all__ = ["CLIP_FAMILIES", "TrainConfig"]

#: Families whose products of activations blow up without clipping (QuadraLib clips at 0.5).
CLIP_FAMILIES = {"quadratic": 0.5, "multiplicative": 0.5}


@dataclass
class TrainConfig:
    """A training recipe. Defaults are the usual CIFAR ResNet recipe (SGD + cosine)."""

    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"  # or "adamw"
    #: Peak learning rate; None = 0.1 for SGD, 1e-3 for AdamW (scaled by batch_size / 128).
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    #: None = 5e-4 for SGD, 0.05 for AdamW; never applied to norms, biases, Dirac alpha/beta.
    weight_decay: float | None = None
    #: Linear warm-up length, capped at a quarter of the run so short runs still anneal.
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    #: Max gradient norm; "auto" = 0.5 for quadratic/multiplicative plans, else none; 0 = off.
    clip_grad: float | str = "auto"
    amp: bool = False
    amp_dtype: str = "bf16"  # or "fp16" (uses a GradScaler)
    #: None = on for CUDA, off for CPU.
    channels_last: bool | None = None
    compile: bool = False
    #: EMA decay per step (e.g. 0.9999); None = no EMA. Evaluation and saving use the EMA.
    ema: float | None = None
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    workers: int | None = None  # None = min(8, cores) on CUDA, 0 on CPU
    #: Train-loss/accuracy synchronisation interval in steps (also the divergence check).
    log_interval: int = 20
    progress: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject nonsense early, as one-line errors."""
        if self.epochs < 1 or self.batch_size < 1:
            raise AutobuildError("--epochs and --batch-size must be at least 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise AutobuildError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.amp_dtype not in ("bf16", "fp16"):
            raise AutobuildError(f"--amp-dtype must be bf16 or fp16, got {self.amp_dtype!r}")
        if isinstance(self.clip_grad, str) and self.clip_grad != "auto":
            try:
                self.clip_grad = float(self.clip_grad)
            except ValueError:
                raise AutobuildError(f"--clip-grad must be a number or auto, got "
                                     f"{self.clip_grad!r}") from None
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise AutobuildError(f"--ema is a decay in (0, 1), got {self.ema}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise AutobuildError("--label-smoothing must be in [0, 1)")

    # ---- resolved values ------------------------------------------------------------------
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 0.1 if self.optimizer == "sgd" else 1e-3
        return base * self.batch_size / 128  # linear scaling rule (Goyal et al. 2017)

    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def max_grad_norm(self, families: set[str]) -> float | None:
        if self.clip_grad == "auto":
            limits = [CLIP_FAMILIES[f] for f in families if f in CLIP_FAMILIES]
            return min(limits) if limits else None
        return float(self.clip_grad) or None

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})
