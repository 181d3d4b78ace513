"""Per-epoch metrics and ``metrics.csv``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["DetectionEpochMetrics", "EpochMetrics", "write_csv"]


class _EpochRecord:
    """A metrics row: its dataclass fields are the CSV columns; ``epoch`` is an int, the rest
    floats."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Any:
        return cls(**{f.name: (int if f.name == "epoch" else float)(data[f.name])
                      for f in fields(cls)})  # type: ignore[arg-type]


@dataclass
class EpochMetrics(_EpochRecord):
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

    def line(self) -> str:
        return (f"epoch {self.epoch}: train loss {self.train_loss:.4f} acc {self.train_acc:.2f}% "
                f"| val loss {self.val_loss:.4f} top-1 {self.val_top1:.2f}% top-5 "
                f"{self.val_top5:.2f}% | lr {self.lr:.3g} | {self.images_per_s:.0f} img/s "
                f"| {self.seconds:.1f}s | {self.peak_mem_mb:.0f} MiB")


@dataclass
class DetectionEpochMetrics(_EpochRecord):
    """One detection epoch: SSD's training losses and the COCO-style val mAP (0..1)."""

    epoch: int
    train_loss: float
    train_bbox_loss: float
    train_cls_loss: float
    map: float  # mean AP over IoU 0.50:0.95 (COCO), on the val split
    map_50: float  # AP at IoU 0.5 (the Pascal VOC metric)
    map_75: float
    lr: float
    images_per_s: float
    seconds: float
    peak_mem_mb: float

    def line(self) -> str:
        return (f"epoch {self.epoch}: train loss {self.train_loss:.4f} (box "
                f"{self.train_bbox_loss:.4f}, cls {self.train_cls_loss:.4f}) | val mAP "
                f"{self.map:.4f} mAP@0.5 {self.map_50:.4f} | lr {self.lr:.3g} | "
                f"{self.images_per_s:.1f} img/s | {self.seconds:.1f}s | "
                f"{self.peak_mem_mb:.0f} MiB")


def write_csv(path: str, history: Sequence[Any]) -> None:
    """Rewrite the whole file atomically (so a resumed run never shows stale rows).
    ``history`` holds one metrics dataclass per epoch (:class:`EpochMetrics`, or a
    task's own, e.g. detection's); its fields are the columns."""
    buf = io.StringIO()
    names = [f.name for f in fields(type(history[0]) if history else EpochMetrics)]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for m in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in m.to_dict().items()})
    from autobuild.files import atomic_write_text

    atomic_write_text(path, buf.getvalue())
