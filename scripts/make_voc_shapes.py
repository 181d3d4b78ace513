"""Write a small detection set in the Pascal VOC2007 layout: shapes on noise.

    .venv/bin/python scripts/make_voc_shapes.py data/voc-shapes --train 400 --val 100 --size 128

Each image holds 1-3 filled shapes in random colours (rectangle, ellipse, triangle, and
cross with ``--classes 4``; the class is the shape, not the colour) drawn by
``autobuild.train.synthetic_detection_sample``
(the generator behind ``--data synthetic-detection``), saved as JPEG with a VOC XML
annotation (1-based inclusive pixel boxes), ``ImageSets/Main/{train,val}.txt`` and a
``classes.txt`` naming the shapes. ``autobuild train ... --data voc:DIR`` reads it like
VOC2007. The same arguments always write the same files.
"""

from __future__ import annotations

import argparse
import os
from xml.sax.saxutils import escape

from autobuild.train import synthetic_detection_sample

SHAPES = ("rectangle", "ellipse", "triangle", "cross")


def _xml(name: str, size: int, boxes: list[tuple[int, ...]], labels: list[str]) -> str:
    objects = "".join(
        f"  <object>\n    <name>{escape(label)}</name>\n    <difficult>0</difficult>\n"
        f"    <bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox>\n  </object>\n"
        for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True))
    return (f"<annotation>\n  <folder>VOC2007</folder>\n  <filename>{name}</filename>\n"
            f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>\n"
            f"{objects}</annotation>\n")


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to create (Annotations/, JPEGImages/, ImageSets/Main/)")
    p.add_argument("--train", type=int, default=400, help="training images (default 400)")
    p.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--classes", type=int, default=3, choices=range(1, len(SHAPES) + 1),
                   help="number of shape classes (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from PIL import Image

    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    splits = {"train": range(args.train), "val": range(args.train, args.train + args.val)}
    for split, indices in splits.items():
        ids = []
        for i in indices:
            image, boxes, labels = synthetic_detection_sample(i, size=args.size,
                                                              classes=args.classes,
                                                              seed=args.seed)
            image_id = f"{i:06d}"
            jpg = os.path.join(args.out, "JPEGImages", f"{image_id}.jpg")
            Image.fromarray(image).save(jpg + ".tmp", format="JPEG", quality=95)
            os.replace(jpg + ".tmp", jpg)
            _write(os.path.join(args.out, "Annotations", f"{image_id}.xml"),
                   _xml(f"{image_id}.jpg", args.size, [tuple(int(v) for v in b) for b in boxes],
                        [SHAPES[k - 1] for k in labels]))
            ids.append(image_id)
        _write(os.path.join(args.out, "ImageSets", "Main", f"{split}.txt"), "\n".join(ids) + "\n")
    _write(os.path.join(args.out, "classes.txt"), "\n".join(SHAPES[:args.classes]) + "\n")
    print(f"wrote {args.train} train + {args.val} val images ({args.size}x{args.size}, "
          f"classes {', '.join(SHAPES[:args.classes])}) to {args.out}")


if __name__ == "__main__":
    main()
