"""The training recipe: one dataclass, every field a CLI flag of ``autobuild train``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from autobuild.errors import AutobuildError

__all__ = ["CLIP_FAMILIES", "DETECTION_CLIP_FAMILIES", "TrainConfig"]

#: Families whose products of activations blow up without clipping (QuadraLib clips at 0.5).
CLIP_FAMILIES = {"quadratic": 0.5, "multiplicative": 0.5}
#: The same for detectors, whose SSD loss has gradient norms of 100-200 at the start: 0.5
#: all but stops a quadratic SSDlite, no clipping lets its weights explode, 10 trains it
#: (docs/benchmarks.md, Detection).
DETECTION_CLIP_FAMILIES = {"quadratic": 10.0, "multiplicative": 10.0}


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
    #: "cosine" (to zero) or "multistep" (x lr_gamma at each of lr_milestones), after warm-up.
    lr_schedule: str = "cosine"
    #: Epochs where "multistep" decays; None = at 2/3 and 11/12 of the run (SSD300's 80, 110
    #: of 120 epochs).
    lr_milestones: list[int] | None = None
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    #: Max gradient norm; "auto" = 0.5 for quadratic/multiplicative plans (10 for detectors),
    #: else none; 0 = off.
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
    #: TensorBoard log directory (rank 0): scalars every epoch, histograms every
    #: ``tensorboard_every`` epochs. None = no logging.
    tensorboard: str | None = None
    tensorboard_every: int = 5

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
        if self.lr_schedule not in ("cosine", "multistep"):
            raise AutobuildError(f"--lr-schedule must be cosine or multistep, got "
                                 f"{self.lr_schedule!r}")
        if self.lr_milestones is not None:
            self.lr_milestones = sorted(int(m) for m in self.lr_milestones)
            if any(m < 1 for m in self.lr_milestones):
                raise AutobuildError("--lr-milestones are epochs, at least 1")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise AutobuildError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.tensorboard_every < 1:
            raise AutobuildError("--tensorboard-every must be at least 1")

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

    def max_grad_norm(self, families: set[str], table: dict[str, float] | None = None
                      ) -> float | None:
        """The clipping norm: "auto" looks the plan's families up in ``table`` (default
        :data:`CLIP_FAMILIES`; detection passes :data:`DETECTION_CLIP_FAMILIES`)."""
        if self.clip_grad == "auto":
            table = CLIP_FAMILIES if table is None else table
            limits = [table[f] for f in families if f in table]
            return min(limits) if limits else None
        return float(self.clip_grad) or None

    def milestones(self) -> list[int]:
        """The epochs after which "multistep" multiplies the lr by ``lr_gamma``."""
        if self.lr_milestones is not None:
            return list(self.lr_milestones)
        return sorted({max(1, round(self.epochs * 2 / 3)), max(1, round(self.epochs * 11 / 12))})

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})
