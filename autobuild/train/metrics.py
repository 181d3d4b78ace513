"""Per-epoch metrics and ``metrics.csv``."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields

__all__ = ["EpochMetrics", "write_csv"]


@dataclass
class EpochMetrics:
    """What one epoch measured (val_* are on the whole val set, on every rank's share)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_s: float
    seconds: float
    #: Peak GPU memory allocated (CUDA) or peak resident memory of the process (CPU), MiB.
    peak_mem_mb: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> EpochMetrics:
        return cls(**{f.name: (int if f.name == "epoch" else float)(data[f.name])
                      for f in fields(cls)})

    def line(self) -> str:
        return (f"epoch {self.epoch}: train loss {self.train_loss:.4f} acc {self.train_acc:.2f}% "
                f"| val loss {self.val_loss:.4f} top-1 {self.val_top1:.2f}% top-5 "
                f"{self.val_top5:.2f}% | lr {self.lr:.3g} | {self.images_per_s:.0f} img/s "
                f"| {self.seconds:.1f}s | {self.peak_mem_mb:.0f} MiB")


def write_csv(path: str, history: list[EpochMetrics]) -> None:
    """Rewrite the whole file atomically (so a resumed run never shows stale rows)."""
    buf = io.StringIO()
    names = [f.name for f in fields(EpochMetrics)]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for m in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in m.to_dict().items()})
    from autobuild.io import atomic_write_text

    atomic_write_text(path, buf.getvalue())
